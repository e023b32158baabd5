//! The command-line convention of every binary: a bad command line prints the error and the
//! usage and exits with code 2 (clap omits the usage for some errors, e.g. invalid values).

/// Parses the command line into `T`, or exits: 0 for `--help`/`--version`, 2 with usage otherwise.
pub fn parse_or_exit<T: clap::Parser>() -> T {
    parse_command_or_exit(T::command())
}

/// As [`parse_or_exit`], with a command adjusted by the binary (e.g. other defaults).
pub fn parse_command_or_exit<T: clap::FromArgMatches>(command: clap::Command) -> T {
    let usage = command.clone().render_usage();
    command
        .try_get_matches()
        .and_then(|matches| T::from_arg_matches(&matches))
        .unwrap_or_else(|e| {
            if !e.use_stderr() {
                e.exit(); // --help, --version
            }
            let message = e.render().to_string();
            eprint!("{message}");
            if !message.contains("Usage:") {
                eprintln!("\n{usage}");
            }
            std::process::exit(2)
        })
}

/// The exit of a binary: success, or `program: error` (with its causes) on stderr and code 1.
pub fn exit_code<E: std::fmt::Display>(
    program: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
