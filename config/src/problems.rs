//! Problems found in a configuration: each with the key path it is about, all collected in one
//! place so a user sees every mistake at once.

use std::fmt;
use std::path::PathBuf;

/// One problem found in a configuration, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `streams.declare.telemetry.partitions`, or the file for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} configuration problem(s):\n{}", .0.len(), render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The one collector every section's validation adds to.
#[derive(Debug, Default)]
pub(crate) struct Problems(pub(crate) Vec<Problem>);

impl Problems {
    /// A problem with the key at `path`.
    pub(crate) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// `v` must lie in `lo..=hi`.
    pub(crate) fn in_range(&mut self, path: impl Into<String>, v: u64, lo: u64, hi: u64) {
        if !(lo..=hi).contains(&v) {
            self.add(path, format!("{v} is outside the allowed {lo}..={hi}"));
        }
    }

    /// `v` must not be zero.
    pub(crate) fn at_least_one(&mut self, path: impl Into<String>, v: u64) {
        if v == 0 {
            self.add(path, "must be at least 1");
        }
    }
}
