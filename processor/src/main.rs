use processor::cli::{Args, NodeConfig};

/// mimalloc instead of glibc malloc: records are allocated on the consumer thread and freed on
/// the tokio workers, and glibc's per-thread arenas grew and shrank their heaps under that
/// pattern (sysmalloc/grow_heap were 18% of the consumer thread's profile; docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args: Args = proto::cli::parse_or_exit();
    let config = match NodeConfig::from_args(args) {
        Ok(config) => config,
        Err(message) => {
            use clap::CommandFactory;
            let mut cmd = Args::command();
            cmd.error(clap::error::ErrorKind::ValueValidation, message).exit();
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ractor_cluster=warn,ractor=warn")),
        )
        .with_target(false)
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
            std::process::ExitCode::FAILURE
        }
    }
}
