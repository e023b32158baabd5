use processor::cli::{Args, NodeConfig};

fn main() -> std::process::ExitCode {
    let args: Args = proto::cli::parse_or_exit();
    let config = match NodeConfig::from_args(args) {
        Ok(config) => config,
        Err(message) => {
            use clap::CommandFactory;
            let mut cmd = Args::command();
            cmd.error(clap::error::ErrorKind::ValueValidation, message)
                .exit();
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,ractor_cluster=error,ractor=warn")
            }),
        )
        .with_target(false)
        // Colours only for a person at a terminal; log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    match runtime.block_on(processor::node::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("processor: {e:#}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
