//! Bank accounts, the third application on the `kafka-sharding` runtime, and the one that acts:
//! deposits, withdrawals and transfers are *commands*, answered with the new balance only once
//! the change is committed, refused ("insufficient funds") from the balance as it is when the
//! command runs, and applied once per idempotency key however often a caller retries.
//!
//! A transfer is a command to the debited account, which answers once the debit is committed
//! and sends the credit to the other account as a message (delivered exactly once, on
//! whichever node hosts it); the credited account emits the completed transfer to
//! [`TRANSFERS_COMPLETED`], exactly once. A scheduled transfer is a durable timer on the
//! debited account, set by a command and fired by the runtime at its time (or, after
//! downtime, as soon as the account's shard is back) on whichever node owns the account then;
//! its message performs the transfer, or, if the funds are short then, moves nothing and
//! emits the refusal to [`TRANSFERS_REFUSED`].
//!
//! - [`Accounts`]: the entity (an account's balance; [`Op`]s change it);
//! - [`service`]: the gRPC `bank.Accounts` service (`proto/proto/bank.proto`).

pub mod service;

use kafka_sharding::{Effects, Entity, Json, Rejection};
use serde::{Deserialize, Serialize};

/// The entity type: one per account, keyed by account id.
pub struct Accounts;

/// What changes an account: a command sent through [`service`], a message from another
/// account, or a record of the accounts topic (JSON, e.g. `{"Deposit":{"amount":500}}`: a
/// batch import needs no gRPC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Deposit {
        amount: i64,
    },
    Withdraw {
        amount: i64,
    },
    /// Debit this account and credit `to` (a command). `transfer_id`: the caller's idempotency
    /// key, else the runtime's id of the command's record.
    TransferOut {
        to: String,
        amount: i64,
        transfer_id: Option<String>,
    },
    /// The credit of a transfer (a message from the debited account `from`).
    TransferIn {
        from: String,
        amount: i64,
        transfer_id: String,
    },
    /// Transfer to `to` at `at_ms` (a command): sets a timer named `transfer_id` whose
    /// message is [`Op::TransferDue`]. Refused ([`SCHEDULED_IN_THE_PAST`]) when `at_ms` is
    /// before `requested_ms`, the time the caller asked (by the clock of the node it asked).
    /// That time travels in the op, rather than the check being made against the clock when
    /// the command arrives, so that it is made once, when the command first runs: a retry with
    /// the same idempotency key after `at_ms` has passed gets the first answer (scheduled, or
    /// already fired), not a refusal for a transfer that was in fact made.
    ScheduleTransfer {
        to: String,
        amount: i64,
        at_ms: i64,
        transfer_id: String,
        /// Absent (0) in ops written before it existed: never refused as past.
        #[serde(default)]
        requested_ms: i64,
    },
    /// A scheduled transfer's time came (the timer's message to the debited account).
    TransferDue {
        to: String,
        amount: i64,
        transfer_id: String,
    },
}

/// An account's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Cents; never negative.
    pub balance: i64,
}

/// Why an op changes nothing.
pub const INSUFFICIENT_FUNDS: &str = "insufficient funds";

/// How the refusal of a transfer scheduled before the time it was asked begins (the service
/// answers it with `INVALID_ARGUMENT`, as a bad argument).
pub const SCHEDULED_IN_THE_PAST: &str = "at_unix_ms is in the past";

/// The topic every credited transfer is emitted to (key: the transfer id; value: JSON
/// `{"from","to","amount"}`).
pub const TRANSFERS_COMPLETED: &str = "transfers-completed";

/// The topic a scheduled transfer that could not be made when due is emitted to (key: the
/// transfer id; value: JSON `{"from","to","amount","reason"}`).
pub const TRANSFERS_REFUSED: &str = "transfers-refused";

/// A scheduled transfer refused when due, as emitted to [`TRANSFERS_REFUSED`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub reason: String,
}

/// A completed transfer, as emitted to [`TRANSFERS_COMPLETED`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completed {
    pub from: String,
    pub to: String,
    pub amount: i64,
}

fn positive(amount: i64) -> Result<i64, String> {
    if amount <= 0 {
        return Err(format!("amount must be positive, got {amount}"));
    }
    Ok(amount)
}

impl Account {
    fn credit(&mut self, amount: i64) -> Result<i64, String> {
        self.balance = self
            .balance
            .checked_add(positive(amount)?)
            .ok_or("the balance would overflow")?;
        Ok(self.balance)
    }

    fn debit(&mut self, amount: i64) -> Result<i64, String> {
        if positive(amount)? > self.balance {
            return Err(INSUFFICIENT_FUNDS.into());
        }
        self.balance -= amount;
        Ok(self.balance)
    }

    /// Debits `amount` and sends the credit to `to` as a message.
    fn transfer(
        &mut self,
        to: &str,
        amount: i64,
        transfer_id: String,
        effects: &mut Effects<'_, Accounts>,
    ) -> Result<i64, String> {
        let balance = self.debit(amount)?;
        let from = effects.id().to_owned();
        effects.send(
            to.to_owned(),
            Op::TransferIn {
                from,
                amount,
                transfer_id,
            },
        );
        Ok(balance)
    }

    /// Runs `op`: the balance after it, or why it changes nothing. A transfer sends its credit
    /// and a credit emits its completion through `effects`.
    pub fn run(&mut self, op: &Op, effects: &mut Effects<'_, Accounts>) -> Result<i64, String> {
        match op {
            Op::Deposit { amount } => self.credit(*amount),
            Op::Withdraw { amount } => self.debit(*amount),
            Op::TransferOut { to, .. } | Op::ScheduleTransfer { to, .. } if to == effects.id() => {
                Err("cannot transfer to the same account".into())
            }
            Op::TransferOut {
                to,
                amount,
                transfer_id,
            } => {
                let transfer_id = transfer_id.clone().unwrap_or_else(|| effects.input_id());
                self.transfer(to, *amount, transfer_id, effects)
            }
            Op::ScheduleTransfer {
                to,
                amount,
                at_ms,
                transfer_id,
                requested_ms,
            } => {
                if at_ms < requested_ms {
                    return Err(format!(
                        "{SCHEDULED_IN_THE_PAST}: {at_ms}, asked at {requested_ms}"
                    ));
                }
                positive(*amount)?;
                let due = Op::TransferDue {
                    to: to.clone(),
                    amount: *amount,
                    transfer_id: transfer_id.clone(),
                };
                effects
                    .set_timer(transfer_id.clone(), *at_ms, due)
                    .map_err(|e| e.to_string())?;
                Ok(self.balance)
            }
            Op::TransferDue {
                to,
                amount,
                transfer_id,
            } => {
                let made = self.transfer(to, *amount, transfer_id.clone(), effects);
                if let Err(reason) = &made {
                    let refused = Refused {
                        from: effects.id().to_owned(),
                        to: to.clone(),
                        amount: *amount,
                        reason: reason.clone(),
                    };
                    effects.emit(
                        TRANSFERS_REFUSED,
                        Some(transfer_id.as_bytes()),
                        Some(serde_json::to_vec(&refused).expect("a refusal serialises")),
                    );
                }
                made
            }
            Op::TransferIn {
                from,
                amount,
                transfer_id,
            } => match self.credit(*amount) {
                Ok(balance) => {
                    let completed = Completed {
                        from: from.clone(),
                        to: effects.id().to_owned(),
                        amount: *amount,
                    };
                    effects.emit(
                        TRANSFERS_COMPLETED,
                        Some(transfer_id.as_bytes()),
                        Some(serde_json::to_vec(&completed).expect("a transfer serialises")),
                    );
                    Ok(balance)
                }
                // The credit cannot land (the balance would overflow): the money goes back.
                Err(reason) => {
                    effects.send(from.clone(), Op::Deposit { amount: *amount });
                    Err(reason)
                }
            },
        }
    }
}

impl Entity for Accounts {
    type Event = Op;
    type State = Account;
    type Query = ();
    type Reply = i64;
    /// JSON for ops and states (changelog and commands), and the balance and the empty
    /// query between nodes.
    type Codec = Json;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<Op, Rejection> {
        Ok(serde_json::from_slice(value.unwrap_or_default())?)
    }

    /// Without effects (the runtime runs every op through `handle`): deposits and withdrawals.
    fn apply(account: &mut Account, op: &Op) {
        let _ = match op {
            Op::Deposit { amount } => account.credit(*amount),
            Op::Withdraw { amount } => account.debit(*amount),
            Op::TransferOut { .. }
            | Op::TransferIn { .. }
            | Op::ScheduleTransfer { .. }
            | Op::TransferDue { .. } => Ok(account.balance),
        };
    }

    fn query(account: &Account, _: &()) -> i64 {
        account.balance
    }

    fn handle(account: &mut Account, op: &Op, effects: &mut Effects<'_, Self>) {
        match account.run(op, effects) {
            Ok(balance) => effects.reply(balance),
            Err(reason) => effects.refuse(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withdrawals_never_overdraw_and_bad_amounts_change_nothing() {
        let mut account = Account::default();
        assert_eq!(account.credit(500), Ok(500));
        assert_eq!(account.debit(501), Err(INSUFFICIENT_FUNDS.into()));
        assert_eq!(account.debit(200), Ok(300));
        assert!(account.credit(0).is_err());
        assert!(account.debit(-5).is_err());
        assert!(account.credit(i64::MAX).is_err());
        assert_eq!(account.balance, 300);
    }

    #[test]
    fn ops_and_accounts_cross_the_wire_as_json() {
        let op = Op::TransferOut {
            to: "b".into(),
            amount: 7,
            transfer_id: None,
        };
        use kafka_sharding::Codec;
        let bytes = <Json as Codec<Op>>::encode(&op).unwrap();
        assert_eq!(<Json as Codec<Op>>::decode(&bytes), Ok(op));
        assert_eq!(
            Accounts::decode("a", Some(br#"{"Deposit":{"amount":5}}"#)),
            Ok(Op::Deposit { amount: 5 })
        );
        assert!(Accounts::decode("a", Some(b"garbage")).is_err());
    }
}
