//! The contract shared by the producer, the processor and the client.
//!
//! - [`events`], [`service`]: generated protobuf types (Kafka record value, gRPC front end).
//! - [`cli`]: the shared command-line convention (usage + exit 2 on bad arguments).
//! - [`ledger`]: the expected-totals file a producer run writes and `client verify` checks.

pub mod cli;
pub mod ledger;

/// The Kafka record value on the input topic.
pub mod events {
    tonic::include_proto!("userevents");
}

/// The gRPC front end every node serves.
pub mod service {
    tonic::include_proto!("userservice");
}

/// The bank accounts' gRPC contract (the `accounts` application).
pub mod bank {
    tonic::include_proto!("bank");
}

/// Encoded `FileDescriptorSet` of every proto here, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");
