//! Progress of long commands on stderr: a bar with its rate and ETA when stderr is a terminal
//! (indicatif), plain lines when it is not (logs, CI, pipes).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar of `len` units (`unit`: "step", "episode", "run") starting at `pos`.
    pub fn new(len: u64, pos: u64, unit: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::new(len);
        let template = format!("{{bar:30.cyan/blue}} {{pos}}/{{len}} {unit}s  {{per_sec}}  ETA {{eta}}  {{msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_position(pos);
        bar.reset_eta();
        Self { bar: Some(bar) }
    }

    /// A spinner with the elapsed time for work of unknown length (a plain line when stderr is
    /// not a terminal).
    pub fn spinner(what: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            eprintln!("{what}");
            return Self { bar: None };
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Self { bar: Some(bar) }
    }

    /// One more unit done: on a terminal the bar moves and shows `short`; otherwise `line` is
    /// printed (when not empty).
    pub fn tick(&self, short: &str, line: &str) {
        match &self.bar {
            Some(b) => {
                b.set_message(short.to_string());
                b.inc(1);
            }
            None if !line.is_empty() => eprintln!("{line}"),
            None => {}
        }
    }

    /// A line printed above the bar (or plainly).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
