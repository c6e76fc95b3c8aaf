//! How long work looks while it runs: on a terminal, a spinner (indicatif)
//! naming what is being done (a boot's phases as they complete, an image
//! build's steps) with the time so far, and the daemon's progress lines
//! above it; elsewhere, the progress lines alone, as plain lines (what
//! scripts and logs want). `BANGER_PROGRESS=plain` asks for plain lines on
//! a terminal too.

use std::io::IsTerminal;
use std::time::Duration;

use banger_core::api::Event;
use banger_core::text::escape_control;
use indicatif::{ProgressBar, ProgressStyle};

/// What a phase the daemon reports is called on the spinner.
fn phase_label(name: &str) -> &str {
    match name {
        "create" => "disks",
        "network" => "network",
        "confine" => "confinement",
        "spawn" => "VMM",
        "config" => "VMM configured",
        "boot" => "guest up",
        "clock" => "clock",
        other => other,
    }
}

pub struct Ui {
    bar: Option<ProgressBar>,
    what: String,
    done: Vec<String>,
}

impl Ui {
    /// A spinner labelled `what` ("booting scratch") if stderr is a
    /// terminal, else nothing but plain lines.
    pub fn new(what: impl Into<String>) -> Ui {
        let what = what.into();
        let plain = std::env::var("BANGER_PROGRESS").is_ok_and(|v| v == "plain");
        let bar = (!plain && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                b.set_style(style);
            }
            b.set_message(what.clone());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Ui {
            bar,
            what,
            done: Vec::new(),
        }
    }

    /// Shows one event of the daemon's (text from a guest is escaped).
    pub fn event(&mut self, e: Event) {
        match e {
            Event::Progress { message } => {
                let m = escape_control(&message, true);
                match &self.bar {
                    Some(b) => {
                        b.println(&m);
                        b.set_message(format!("{}: {}", self.what, m));
                    }
                    None => eprintln!("{m}"),
                }
            }
            Event::Spec { line } => match &self.bar {
                Some(b) => b.println(escape_control(&line, true)),
                None => eprintln!("{}", escape_control(&line, true)),
            },
            Event::Phase { name, .. } => {
                if let Some(b) = &self.bar {
                    if !name.ends_with("-async") {
                        self.done.push(phase_label(&name).to_string());
                    }
                    b.set_message(format!("{}: {} done", self.what, self.done.join(", ")));
                }
            }
            Event::Log { text } => {
                self.clear();
                print!("{}", escape_control(&text, true));
            }
            Event::Ready { .. } => self.clear(),
        }
    }

    /// The spinner, for code that must clear it while events still flow
    /// (a command's own output starts).
    pub fn handle(&self) -> Option<ProgressBar> {
        self.bar.clone()
    }

    pub fn clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.clear();
    }
}
