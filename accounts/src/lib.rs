//! Bank accounts, the third application on the `kafka-sharding` runtime, and the one that acts:
//! deposits and withdrawals are *commands*, answered with the new balance only once the change
//! is committed, refused ("insufficient funds") from the balance as it is when the command
//! runs, and applied once per idempotency key however often a caller retries.
//!
//! - [`Accounts`]: the entity (an account's balance; [`Op`]s change it);
//! - [`service`]: the gRPC `bank.Accounts` service (`proto/proto/bank.proto`).
//!
//! Transfers between accounts need messages between entities and scheduled transfers need
//! durable timers; neither is built yet, so `Transfer` and `ScheduleTransfer` answer
//! UNIMPLEMENTED.

pub mod service;

use kafka_sharding::{Codec, DecodeError, Effects, Entity, Rejection};
use serde::{Deserialize, Serialize};

/// The entity type: one per account, keyed by account id.
pub struct Accounts;

/// What changes an account: a command sent through [`service`], or a record of the accounts
/// topic (JSON, e.g. `{"Deposit":{"amount":500}}`: a batch import needs no gRPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Deposit { amount: i64 },
    Withdraw { amount: i64 },
}

/// An account's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Cents; never negative.
    pub balance: i64,
}

/// Why an op changes nothing.
pub const INSUFFICIENT_FUNDS: &str = "insufficient funds";

impl Op {
    /// The balance after this op, or why it cannot run (the account is left as it was).
    pub fn run(self, account: &mut Account) -> Result<i64, String> {
        let balance = match self {
            Op::Deposit { amount } | Op::Withdraw { amount } if amount <= 0 => {
                return Err(format!("amount must be positive, got {amount}"))
            }
            Op::Deposit { amount } => account
                .balance
                .checked_add(amount)
                .ok_or("the balance would overflow")?,
            Op::Withdraw { amount } if amount > account.balance => {
                return Err(INSUFFICIENT_FUNDS.into())
            }
            Op::Withdraw { amount } => account.balance - amount,
        };
        account.balance = balance;
        Ok(balance)
    }
}

impl Entity for Accounts {
    type Event = Op;
    type State = Account;
    type Query = ();
    type Reply = i64;
    type Codec = Json;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<Op, Rejection> {
        Ok(serde_json::from_slice(value.unwrap_or_default())?)
    }

    /// An op read from the topic (no one to answer): a refused one changes nothing.
    fn apply(account: &mut Account, op: &Op) {
        let _ = op.run(account);
    }

    fn query(account: &Account, _: &()) -> i64 {
        account.balance
    }

    fn handle(account: &mut Account, op: &Op, effects: &mut Effects<Self>) {
        match op.run(account) {
            Ok(balance) => effects.reply(balance),
            Err(reason) => effects.refuse(reason),
        }
    }
}

/// JSON for ops and states (changelog and commands), and the balance and the empty query
/// between nodes.
pub struct Json;

impl<T: Serialize + for<'de> Deserialize<'de>> Codec<T> for Json {
    fn encode(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).expect("ops, accounts and balances serialise")
    }
    fn decode(bytes: &[u8]) -> Result<T, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withdrawals_never_overdraw_and_bad_amounts_change_nothing() {
        let mut account = Account::default();
        assert_eq!(Op::Deposit { amount: 500 }.run(&mut account), Ok(500));
        assert_eq!(
            Op::Withdraw { amount: 501 }.run(&mut account),
            Err(INSUFFICIENT_FUNDS.into())
        );
        assert_eq!(Op::Withdraw { amount: 200 }.run(&mut account), Ok(300));
        assert!(Op::Deposit { amount: 0 }.run(&mut account).is_err());
        assert!(Op::Withdraw { amount: -5 }.run(&mut account).is_err());
        assert!(Op::Deposit { amount: i64::MAX }.run(&mut account).is_err());
        assert_eq!(account.balance, 300);
    }

    #[test]
    fn ops_and_accounts_cross_the_wire_as_json() {
        let op = Op::Withdraw { amount: 7 };
        assert_eq!(<Json as Codec<Op>>::decode(&Json::encode(&op)), Ok(op));
        assert_eq!(
            Accounts::decode("a", Some(br#"{"Deposit":{"amount":5}}"#)),
            Ok(Op::Deposit { amount: 5 })
        );
        assert!(Accounts::decode("a", Some(b"garbage")).is_err());
    }
}
