//! A count of page visits per user, in the successive builds an application goes through, for
//! the state-evolution tests (`processor/tests/state_versions.rs`); one binary stands in for
//! each build of the application, chosen with `--build`:
//!
//! - `1`: the first build; its state is `{count}`.
//! - `2-field-added`: adds the last page visited (a protobuf field added: the states written
//!   by build 1 still decode, so the state version stays 1).
//! - `3-incompatible`: the count becomes text (a field's type changed) and the version was
//!   not raised: build 1's and 2's states no longer decode.
//! - `3-migrating`: the same change done right: state version 2 and a migration from 1.
//!
//! Records of `--topic`: key = user, value = the page (UTF-8). Every build answers the same
//! query (an empty message) with `{count, last_page}`, through the runtime's generic route
//! `POST /entities/<group>/<user>` on the management port: no gRPC service of its own.

use kafka_sharding::app::TypeArgs;
use kafka_sharding::{DecodeError, Entity, Prost, Rejection};

/// The application's options, beside the node's (`kafka_sharding::app::run` adds those).
#[derive(clap::Args)]
struct Args {
    #[command(flatten)]
    visits: TypeArgs,
    /// Which build of the application to run.
    #[arg(long, value_parser = ["1", "2-field-added", "3-incompatible", "3-migrating"])]
    build: String,
}

/// The question every build answers (no fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct VisitsQuery {}

/// Every build's answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VisitsReply {
    #[prost(uint64, tag = "1")]
    pub count: u64,
    #[prost(string, tag = "2")]
    pub last_page: String,
}

/// Build 1's state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountV1 {
    #[prost(uint64, tag = "1")]
    pub count: u64,
}

/// Build 2's state: build 1's and a new field.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountV2 {
    #[prost(uint64, tag = "1")]
    pub count: u64,
    #[prost(string, tag = "2")]
    pub last_page: String,
}

/// Build 3's state: the count as decimal text (tag 1 changes its wire type).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountText {
    #[prost(string, tag = "1")]
    pub count: String,
    #[prost(string, tag = "2")]
    pub last_page: String,
}

/// A page visited.
pub struct Visit(String);

fn visit(value: Option<&[u8]>) -> Result<Visit, Rejection> {
    Ok(Visit(
        std::str::from_utf8(value.unwrap_or_default())?.to_string(),
    ))
}

struct Build1;

impl Entity for Build1 {
    type Event = Visit;
    type State = CountV1;
    type Query = VisitsQuery;
    type Reply = VisitsReply;
    type Codec = Prost;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<Visit, Rejection> {
        visit(value)
    }
    fn apply(state: &mut CountV1, _: &Visit) {
        state.count += 1;
    }
    fn query(state: &CountV1, _: &VisitsQuery) -> VisitsReply {
        VisitsReply {
            count: state.count,
            last_page: String::new(),
        }
    }
}

struct Build2;

impl Entity for Build2 {
    type Event = Visit;
    type State = CountV2;
    type Query = VisitsQuery;
    type Reply = VisitsReply;
    type Codec = Prost;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<Visit, Rejection> {
        visit(value)
    }
    fn apply(state: &mut CountV2, event: &Visit) {
        state.count += 1;
        state.last_page.clone_from(&event.0);
    }
    fn query(state: &CountV2, _: &VisitsQuery) -> VisitsReply {
        VisitsReply {
            count: state.count,
            last_page: state.last_page.clone(),
        }
    }
}

fn apply_text(state: &mut CountText, event: &Visit) {
    let count: u64 = state.count.parse().unwrap_or(0);
    state.count = (count + 1).to_string();
    state.last_page.clone_from(&event.0);
}

fn query_text(state: &CountText) -> VisitsReply {
    VisitsReply {
        count: state.count.parse().unwrap_or(0),
        last_page: state.last_page.clone(),
    }
}

/// The type change without a new version or a migration (the mistake the runtime must catch).
struct Build3Incompatible;

impl Entity for Build3Incompatible {
    type Event = Visit;
    type State = CountText;
    type Query = VisitsQuery;
    type Reply = VisitsReply;
    type Codec = Prost;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<Visit, Rejection> {
        visit(value)
    }
    fn apply(state: &mut CountText, event: &Visit) {
        apply_text(state, event)
    }
    fn query(state: &CountText, _: &VisitsQuery) -> VisitsReply {
        query_text(state)
    }
}

/// The type change with state version 2 and a migration from builds 1 and 2.
struct Build3Migrating;

impl Entity for Build3Migrating {
    type Event = Visit;
    type State = CountText;
    type Query = VisitsQuery;
    type Reply = VisitsReply;
    type Codec = Prost;
    const STATE_VERSION: u32 = 2;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<Visit, Rejection> {
        visit(value)
    }
    fn apply(state: &mut CountText, event: &Visit) {
        apply_text(state, event)
    }
    fn query(state: &CountText, _: &VisitsQuery) -> VisitsReply {
        query_text(state)
    }
    fn migrate(version: u32, bytes: &[u8]) -> Result<CountText, DecodeError> {
        match version {
            1 => {
                let old = <CountV2 as prost::Message>::decode(bytes)
                    .map_err(|e| DecodeError(e.to_string()))?;
                Ok(CountText {
                    count: old.count.to_string(),
                    last_page: old.last_page,
                })
            }
            other => Err(DecodeError(format!("unknown state version {other}"))),
        }
    }
}

fn main() -> std::process::ExitCode {
    kafka_sharding::app::run("visits", |node, args: Args| {
        let spec = args.visits.entity_type();
        match args.build.as_str() {
            "1" => drop(node.host::<Build1>(spec)),
            "2-field-added" => drop(node.host::<Build2>(spec)),
            "3-incompatible" => drop(node.host::<Build3Incompatible>(spec)),
            _ => drop(node.host::<Build3Migrating>(spec)),
        }
        Ok(())
    })
}
