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
        "restore" => "guest restored",
        "identity" => "identity given",
        "warm-save" => "warm snapshot saved",
        "clock" => "clock",
        other => other,
    }
}

pub struct Ui {
    bar: Option<ProgressBar>,
    what: String,
    done: Vec<String>,
    /// The bar is drawn as one (bytes of `what` so far), not a spinner.
    counting: bool,
}

fn spinner_style() -> Option<ProgressStyle> {
    // wide_msg: cut to the terminal's width, never wrapped.
    ProgressStyle::with_template("{spinner} {elapsed:>3} {wide_msg}").ok()
}

fn bytes_style() -> Option<ProgressStyle> {
    ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})",
    )
    .ok()
    .map(|s| s.progress_chars("=> "))
}

impl Ui {
    /// A spinner labelled `what` ("booting scratch") if stderr is a
    /// terminal, else nothing but plain lines.
    pub fn new(what: impl Into<String>) -> Ui {
        let what = what.into();
        let plain = std::env::var("BANGER_PROGRESS").is_ok_and(|v| v == "plain");
        let bar = (!plain && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            if let Some(style) = spinner_style() {
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
            counting: false,
        }
    }

    /// Shows one event of the daemon's (text from a guest is escaped).
    pub fn event(&mut self, e: Event) {
        match e {
            Event::Progress { message } => {
                let m = escape_control(&message, true);
                self.spin();
                match &self.bar {
                    Some(b) => {
                        b.println(&m);
                        // Work without phases (an image build) is named by
                        // its lines; a boot by its phases.
                        if self.done.is_empty() {
                            b.set_message(format!("{}: {}", self.what, m));
                        }
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
                    b.set_message(self.phase_message());
                }
            }
            Event::Bytes { what, done, total } => {
                if let Some(b) = &self.bar {
                    if !self.counting {
                        if let Some(style) = bytes_style() {
                            b.set_style(style);
                        }
                        b.set_position(0);
                        self.counting = true;
                    }
                    b.set_length(total);
                    b.set_position(done);
                    b.set_message(format!("{}: {}", self.what, escape_control(&what, true)));
                }
            }
            Event::Log { text } => {
                self.clear();
                print!("{}", escape_control(&text, true));
            }
            Event::Ready { .. } => self.clear(),
        }
    }

    /// "booting x: step 3, network done", and once the VMM runs and until
    /// the guest says it is up, what the wait is for.
    fn phase_message(&self) -> String {
        let last = self.done.last().map(String::as_str).unwrap_or("");
        let vmm = self.done.iter().any(|p| p == "VMM");
        let up = self.done.iter().any(|p| p == "guest up");
        let waiting = if vmm && !up {
            ", waiting for the guest"
        } else {
            ""
        };
        format!(
            "{}: step {}, {last} done{waiting}",
            self.what,
            self.done.len()
        )
    }

    /// Back to a spinner after a bar.
    fn spin(&mut self) {
        if let (true, Some(b)) = (self.counting, &self.bar) {
            if let Some(style) = spinner_style() {
                b.set_style(style);
            }
            b.set_length(0);
            self.counting = false;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A Ui drawing nowhere, its bar inspected instead.
    fn hidden(what: &str) -> (Ui, ProgressBar) {
        let b = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
        let ui = Ui {
            bar: Some(b.clone()),
            what: what.into(),
            done: Vec::new(),
            counting: false,
        };
        (ui, b)
    }

    #[test]
    fn phases_name_the_spinner_and_bytes_make_it_a_bar() {
        let (mut ui, b) = hidden("booting x");
        for p in ["create", "network", "nat-async", "spawn"] {
            ui.event(Event::Phase {
                name: p.into(),
                micros: 1,
            });
        }
        assert_eq!(
            b.message(),
            "booting x: step 3, VMM done, waiting for the guest"
        );
        ui.event(Event::Progress {
            message: "booting x (qemu tcg)".into(),
        });
        assert_eq!(
            b.message(),
            "booting x: step 3, VMM done, waiting for the guest",
            "a boot's spinner follows its phases, not its lines"
        );
        ui.event(Event::Phase {
            name: "boot".into(),
            micros: 1,
        });
        assert_eq!(b.message(), "booting x: step 4, guest up done");

        let (mut ui, b) = hidden("importing image i");
        ui.event(Event::Bytes {
            what: "layer 1/2".into(),
            done: 10,
            total: 100,
        });
        assert_eq!((b.position(), b.length()), (10, Some(100)));
        assert_eq!(b.message(), "importing image i: layer 1/2");
        // A line after it: back to a spinner, the line's text shown.
        ui.event(Event::Progress {
            message: "installing \x1b[2Jinit".into(),
        });
        assert!(!ui.counting);
        assert_eq!(b.message(), "importing image i: installing \\x1b[2Jinit");
        ui.clear();
        assert!(b.is_finished());
    }
}
