//! Logging for the binaries built on the runtime: `RUST_LOG` (tracing's env filter) always wins
//! over the binary's default filter, and `--log-format json` writes one JSON object per line
//! (tracing's JSON formatter) for log collectors.

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields.message`, the spans.
    Json,
}

/// Installs the global subscriber writing to stderr: `RUST_LOG` if set, else `default_filter`
/// (e.g. `"info,ractor_cluster=error"`). Call once, first thing in `main`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder
            // Colours only for a person at a terminal; log files and collectors get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}
