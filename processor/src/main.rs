use accounts::service::AccountsService;
use accounts::Accounts;
use kafka_sharding::Node;
use processor::cli::Args;
use processor::purchases::Purchases;
use processor::service::UserStatsService;
use telemetry::service::DeviceTelemetryService;
use telemetry::Devices;

fn main() -> std::process::ExitCode {
    let command = Args::command_with_defaults();
    let args: Args = proto::cli::parse_command_or_exit(command.clone());
    let (config, hosting) = match args.into_config() {
        Ok(parts) => parts,
        Err(message) => {
            let mut command = command;
            command
                .error(clap::error::ErrorKind::ValueValidation, message)
                .exit();
        }
    };
    kafka_sharding::logging::init(config.log_format, "info,ractor_cluster=error,ractor=warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    // Completed and refused transfers are emitted there: they must exist before the first.
    if hosting.accounts.is_some() {
        let replication = config.replication_factor.unwrap_or(-1);
        for topic in [accounts::TRANSFERS_COMPLETED, accounts::TRANSFERS_REFUSED] {
            let created = runtime.block_on(kafka_sharding::admin::ensure_topic(
                &config.kafka,
                topic,
                8,
                replication,
                &[],
            ));
            if let Err(e) = created {
                eprintln!("processor: cannot create topic {topic}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let mut node = Node::new(config);
    let users = node.host::<Purchases>(hosting.purchases);
    node.grpc_service(UserStatsService::server(users))
        .grpc_reflection(proto::FILE_DESCRIPTOR_SET);
    if let Some(telemetry) = hosting.telemetry {
        let devices = node.host::<Devices>(telemetry);
        node.grpc_service(DeviceTelemetryService::server(devices))
            .grpc_reflection(telemetry::FILE_DESCRIPTOR_SET);
    }
    if let Some(accounts) = hosting.accounts {
        let accounts = node.host::<Accounts>(accounts);
        node.grpc_service(AccountsService::server(accounts));
    }
    match runtime.block_on(node.run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("processor: {e:#}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
