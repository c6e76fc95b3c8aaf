//! The HTTP/1.1 the E2B SDKs speak, as a small server over a TCP stream:
//! requests read whole (head and body, `Content-Length` or chunked) within
//! one deadline and within size bounds, answers with a length, and
//! streams as chunked bodies flushed at each write (Connect's server
//! streams). Keep-alive between requests, with an idle bound.
//!
//! Not a general server: what a client controls is bounded (the head's
//! size and its header count, the body's size, the time a whole request
//! may take), and anything else is a 400 and the connection's end.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use thiserror::Error;

/// A request head's bytes at most (the request line and the headers).
const HEAD_MAX: usize = 32 << 10;
/// Headers in one request at most.
const HEADERS_MAX: usize = 100;
/// How long a request's head may take to arrive, once its first byte has.
pub const HEAD_WITHIN: Duration = Duration::from_secs(10);
/// How long a whole request (head and body) may take to arrive.
pub const REQUEST_WITHIN: Duration = Duration::from_secs(120);
/// Bodies larger than a JSON request's (uploads) in flight at once, in
/// bytes at most: past it a request is answered 503.
const LARGE_BODIES: usize = 512 << 20;
/// A body up to this size needs no share of [`LARGE_BODIES`].
const SMALL_BODY: usize = 1 << 20;

static LARGE_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A large body's share of [`LARGE_BODIES`], given back when dropped
/// (with its request).
#[derive(Debug)]
pub struct BodyShare(usize);

impl BodyShare {
    fn take(n: usize) -> Option<BodyShare> {
        let mut s = BodyShare(0);
        s.grow(n).then_some(s)
    }

    /// `n` bytes more, if the bound has room.
    fn grow(&mut self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let mut cur = LARGE_IN_FLIGHT.load(Ordering::SeqCst);
        loop {
            let Some(next) = cur.checked_add(n).filter(|t| *t <= LARGE_BODIES) else {
                return false;
            };
            match LARGE_IN_FLIGHT.compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    self.0 += n;
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for BodyShare {
    fn drop(&mut self) {
        LARGE_IN_FLIGHT.fetch_sub(self.0, std::sync::atomic::Ordering::SeqCst);
    }
}
/// How long a kept-alive connection may wait for its next request, and a
/// new one for its first.
pub const IDLE: Duration = Duration::from_secs(75);
const FIRST: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("the client went away")]
    Closed,
    #[error("bad request: {0}")]
    Bad(String),
    #[error("the request is over {0} bytes")]
    TooLarge(usize),
    #[error("the request did not arrive whole in time")]
    Timeout,
    /// Refused on its head (no body read): its status and why.
    #[error("{1}")]
    Refused(u16, String),
    #[error("too many large requests at once: try again")]
    Busy,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// One request, its body read whole.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    /// The path, percent-encoded as sent.
    pub path: String,
    /// The query's pairs, decoded (`+` as a space).
    pub query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client asked to close after this one (or spoke HTTP/1.0).
    pub close: bool,
    /// A large body's share of the bound, held while it is.
    share: Option<BodyShare>,
}

impl Request {
    /// A header's value (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header (name, value) as sent.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A query parameter's (first) value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A `Content-Encoding: gzip` body decoded: at most `max` bytes, each
/// taken from the large bodies' bound as the output grows (a small
/// compressed body may be a large one).
pub fn gunzip(body: &[u8], max: usize) -> Result<(Vec<u8>, BodyShare), HttpError> {
    let mut share = BodyShare(0);
    let mut out = Vec::new();
    let mut dec = flate2::read::MultiGzDecoder::new(body);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => return Ok((out, share)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Bad(format!("a gzip body: {e}"))),
        };
        if out.len() + n > max {
            return Err(HttpError::TooLarge(max));
        }
        if !share.grow(n) {
            return Err(HttpError::Busy);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// What judges a request's head: the body it may carry, or its refusal
/// (a status and why).
pub type BodyMax<'a> = dyn Fn(&Request) -> Result<usize, (u16, String)> + 'a;

/// The connection's reading side, each read bounded by what is left of
/// the current deadline.
pub struct Conn {
    r: BufReader<Timed>,
    pub w: TcpStream,
    /// Requests read so far.
    served: usize,
}

struct Timed {
    s: TcpStream,
    deadline: Instant,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "deadline",
                ));
            }
            self.s.set_read_timeout(Some(left))?;
            // A signal's interruption (a stop and continue of the daemon
            // ends a timed socket read with EINTR) is no end of the
            // connection: read again with what is left.
            match self.s.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl Conn {
    pub fn new(s: TcpStream) -> std::io::Result<Conn> {
        let w = s.try_clone()?;
        w.set_write_timeout(Some(REQUEST_WITHIN))?;
        Ok(Conn {
            r: BufReader::new(Timed {
                s,
                deadline: Instant::now() + IDLE,
            }),
            w,
            served: 0,
        })
    }

    /// After a refusal sent with the body unread: the writing side shut
    /// and what the client still sends read away (at most `max` bytes,
    /// within `within`), so that it reads the refusal rather than a reset.
    pub fn drain(&mut self, max: usize, within: Duration) {
        let _ = self.w.shutdown(std::net::Shutdown::Write);
        self.r.get_mut().deadline = Instant::now() + within;
        let _ = std::io::copy(&mut (&mut self.r).take(max as u64), &mut std::io::sink());
    }

    /// The next request (`None` when the client closed between requests).
    /// `body_max` judges its head before any of its body is read: how much
    /// it may carry, or its refusal (a status and why).
    pub fn next(&mut self, body_max: &BodyMax<'_>) -> Result<Option<Request>, HttpError> {
        // A new connection's first byte comes soon; later ones may wait.
        let idle = if self.served == 0 { FIRST } else { IDLE };
        self.served += 1;
        self.r.get_mut().deadline = Instant::now() + idle;
        let timed_out = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => HttpError::Timeout,
            _ => HttpError::Io(e),
        };
        // The first byte may wait for the idle bound; the rest of the
        // request arrives within its own.
        if self.r.fill_buf().map_err(timed_out)?.is_empty() {
            return Ok(None);
        }
        let began = Instant::now();
        self.r.get_mut().deadline = began + HEAD_WITHIN;
        let mut head = Vec::new();
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = (&mut self.r)
                .take((HEAD_MAX - head.len()) as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(timed_out)?;
            if n == 0 {
                return Err(HttpError::Closed);
            }
            head.extend_from_slice(&line);
            if head.len() > HEAD_MAX {
                return Err(HttpError::TooLarge(HEAD_MAX));
            }
            let text = String::from_utf8(line)
                .map_err(|_| HttpError::Bad("a header that is not UTF-8".into()))?;
            let text = text.trim_end_matches(['\r', '\n']).to_string();
            if text.is_empty() {
                if lines.is_empty() {
                    // (Blank lines before a request are allowed.)
                    continue;
                }
                break;
            }
            lines.push(text);
            if lines.len() > HEADERS_MAX + 1 {
                return Err(HttpError::Bad(format!("over {HEADERS_MAX} headers")));
            }
        }
        let mut first = lines[0].split(' ');
        let (method, target, version) = (
            first.next().unwrap_or_default().to_string(),
            first.next().unwrap_or_default().to_string(),
            first.next().unwrap_or_default().to_string(),
        );
        if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
            return Err(HttpError::Bad(format!(
                "request line {:?}",
                lines[0].chars().take(80).collect::<String>()
            )));
        }
        let mut headers = Vec::new();
        for l in &lines[1..] {
            let (k, v) = l
                .split_once(':')
                .ok_or_else(|| HttpError::Bad("a header without ':'".into()))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), parse_query(q)),
            None => (target.clone(), Vec::new()),
        };
        let mut req = Request {
            method,
            path,
            query,
            headers,
            body: Vec::new(),
            close: version == "HTTP/1.0",
            share: None,
        };
        if req
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            req.close = true;
        }
        let max = body_max(&req).map_err(|(status, why)| HttpError::Refused(status, why))?;
        self.r.get_mut().deadline = began + REQUEST_WITHIN;
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
        let declared = req
            .header("content-length")
            .map(|l| {
                l.parse::<usize>()
                    .map_err(|_| HttpError::Bad(format!("content-length {l:?}")))
            })
            .transpose()?;
        if let Some(len) = declared.filter(|l| *l > max) {
            let _ = len;
            return Err(HttpError::TooLarge(max));
        }
        // A large body (an upload) takes its share of the bound first (a
        // chunked one as it grows).
        let expect = declared.unwrap_or(0);
        if expect > SMALL_BODY || (chunked && max > SMALL_BODY) {
            req.share = Some(BodyShare::take(expect).ok_or(HttpError::Busy)?);
        }
        if chunked {
            req.body = self
                .chunked_body(max, req.share.as_mut())
                .map_err(|e| match e {
                    HttpError::Io(e) => timed_out(e),
                    e => e,
                })?;
        } else if let Some(len) = declared {
            let mut body = vec![0u8; len];
            self.r.read_exact(&mut body).map_err(timed_out)?;
            req.body = body;
        }
        Ok(Some(req))
    }

    fn chunked_body(
        &mut self,
        max: usize,
        mut share: Option<&mut BodyShare>,
    ) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let mut size = Vec::new();
            (&mut self.r).take(64).read_until(b'\n', &mut size)?;
            let text = String::from_utf8_lossy(&size);
            let hex = text.trim().split(';').next().unwrap_or_default();
            let n = usize::from_str_radix(hex, 16)
                .map_err(|_| HttpError::Bad(format!("chunk size {hex:?}")))?;
            if n == 0 {
                // Trailers (none expected), up to the blank line.
                loop {
                    let mut t = Vec::new();
                    (&mut self.r).take(1024).read_until(b'\n', &mut t)?;
                    if t.is_empty() || t == b"\r\n" || t == b"\n" {
                        return Ok(body);
                    }
                }
            }
            if n > max.saturating_sub(body.len()) {
                return Err(HttpError::TooLarge(max));
            }
            if let Some(s) = share.as_deref_mut() {
                let past = (body.len() + n).saturating_sub(s.0);
                if past > 0 && !s.grow(past) {
                    return Err(HttpError::Busy);
                }
            }
            let at = body.len();
            body.reserve_exact(n);
            body.resize(at + n, 0);
            self.r.read_exact(&mut body[at..])?;
            let mut crlf = [0u8; 2];
            self.r.read_exact(&mut crlf)?;
        }
    }
}

/// `a=1&b=x+y%21` into its pairs, decoded.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// Percent-decoding with `+` as a space (a query or a form's value);
/// invalid escapes are kept as they are.
pub fn form_decode(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

/// Percent-decoding (`%41` to `A`); invalid escapes kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => "Status",
    }
}

/// An answer with a body of known length.
pub fn respond(
    w: &mut impl Write,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if status != 204 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if status != 204 {
        w.write_all(body)?;
    }
    w.flush()
}

/// An answer whose body follows in chunks, each sent as it is written.
pub struct Chunked<W: Write> {
    w: W,
}

impl<W: Write> Chunked<W> {
    pub fn start(mut w: W, status: u16, headers: &[(&str, &str)]) -> std::io::Result<Chunked<W>> {
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        w.write_all(head.as_bytes())?;
        w.flush()?;
        Ok(Chunked { w })
    }

    /// One chunk, sent at once.
    pub fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.w
            .write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
        self.w.write_all(data)?;
        self.w.write_all(b"\r\n")?;
        self.w.flush()
    }

    /// The body's end.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.w.write_all(b"0\r\n\r\n")?;
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_as_forms_do() {
        let q = parse_query("metadata=k%3Dv%252520w&state=running,paused&limit=10&x");
        assert_eq!(q[0], ("metadata".into(), "k=v%2520w".into()));
        assert_eq!(q[1].1, "running,paused");
        assert_eq!(q[3], ("x".into(), String::new()));
        assert_eq!(form_decode("a+b%2Bc%zz%4"), "a b+c%zz%4");
    }

    fn serve(input: &[u8]) -> Result<Option<Request>, HttpError> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let data = input.to_vec();
        let t = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&data).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        let (s, _) = l.accept().unwrap();
        let mut conn = Conn::new(s).unwrap();
        let r = conn.next(&|_| Ok(16));
        drop(conn);
        t.join().unwrap();
        r
    }

    #[test]
    fn requests_are_read_whole_and_bounded() {
        let r = serve(b"POST /a?x=1 HTTP/1.1\r\nContent-Length: 3\r\nX-Api-Key: k\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/a"));
        assert_eq!(r.param("x"), Some("1"));
        assert_eq!(r.header("x-api-key"), Some("k"));
        assert_eq!(r.body, b"abc");
        let r = serve(b"POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"abcde");
        let e = serve(b"POST /s HTTP/1.1\r\nContent-Length: 17\r\n\r\n").unwrap_err();
        assert!(matches!(e, HttpError::TooLarge(16)), "{e}");
        let e = serve(b"POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n").unwrap_err();
        assert!(matches!(e, HttpError::TooLarge(16)), "{e}");
        // A chunk size that would wrap: refused, no panic.
        let e =
            serve(b"POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n")
                .unwrap_err();
        assert!(matches!(e, HttpError::TooLarge(16)), "{e}");
        let e = serve(b"GET nothing HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(matches!(e, HttpError::Bad(_)), "{e}");
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..200 {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(serve(&many).is_err());
        assert!(serve(b"").unwrap().is_none());
    }

    /// A stop and continue of the daemon (a job-control stop, a freezer,
    /// a debugger) ends a timed socket read with EINTR; a connection
    /// waiting for its next request must read on, not answer 400 (CI
    /// saw `400: connection: Interrupted system call`). The stop would
    /// hit every test of this process, so it runs in a child process of
    /// its own.
    #[test]
    fn a_stop_and_continue_does_not_end_a_connection() {
        const CHILD: &str = "BANGER_TEST_STOPPED_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap());
            child
                .args([
                    "--exact",
                    "e2b::http::tests::a_stop_and_continue_does_not_end_a_connection",
                    "--nocapture",
                ])
                .env(CHILD, "1");
            let out = test_infra::bounded::output_within(&mut child, Duration::from_secs(60));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let mut conn = Conn::new(s).unwrap();
            conn.next(&|_| Ok(16)).map(|r| r.map(|r| r.path))
        });
        // Stopped while it waits in its read (the kernel's word for what
        // the thread is doing, not a guess at how long it takes).
        let tid = tid_rx.recv().unwrap();
        let syscall = format!("/proc/self/task/{tid}/syscall");
        let waits = |nr: &str| {
            // read(2) and recvfrom(2) on x86_64 and aarch64.
            let nrs: &[&str] = if cfg!(target_arch = "aarch64") {
                &["63", "207"]
            } else {
                &["0", "45"]
            };
            nrs.contains(&nr)
        };
        let until = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&syscall)
            .is_ok_and(|t| waits(t.split(' ').next().unwrap_or("")))
        {
            assert!(
                !server.is_finished() && Instant::now() < until,
                "the server never waited in its read"
            );
            std::thread::yield_now();
        }
        // From outside: a stopped process cannot continue itself.
        let pid = std::process::id().to_string();
        let st = std::process::Command::new("sh")
            .args(["-c", "kill -STOP \"$0\" && kill -CONT \"$0\"", &pid])
            .status()
            .unwrap();
        assert!(st.success());
        c.write_all(b"GET /after HTTP/1.1\r\n\r\n").unwrap();
        let r = server.join().unwrap();
        assert_eq!(r.unwrap().as_deref(), Some("/after"));
    }
}
