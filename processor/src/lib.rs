//! The purchase sample, the first application on the `kafka-sharding` runtime: users' purchase
//! events in, running totals per user out, through a gRPC front end on every node.
//!
//! - [`purchases`]: the entity (decode a record, apply a purchase, answer the totals);
//! - [`service`]: the gRPC `UserService`;
//! - [`cli`]: the `processor` command line (the runtime's node options plus the topics).

pub mod cli;
pub mod purchases;
pub mod service;
