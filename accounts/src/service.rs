//! The gRPC front end of the accounts: any node takes any account's command (the runtime
//! writes it to the account's partition and answers once the owner committed it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kafka_sharding::{
    CommandError, Entities, MAX_IDEMPOTENCY_KEY_BYTES, MAX_ID_BYTES, MAX_TIMER_DELAY,
};
use proto::bank::accounts_server::{Accounts as AccountsApi, AccountsServer};
use proto::bank::{Account, Balance, Change, Scheduled, TransferRequest};
use tonic::{Request, Response, Status};

use crate::{Accounts, Op, SCHEDULED_IN_THE_PAST};

pub struct AccountsService {
    accounts: Entities<Accounts>,
}

impl AccountsService {
    /// The tonic server to mount on the node.
    pub fn server(accounts: Entities<Accounts>) -> AccountsServer<Self> {
        AccountsServer::new(Self { accounts })
    }

    async fn change(&self, change: Change, op: fn(i64) -> Op) -> Result<Response<Balance>, Status> {
        check_account(&change.account)?;
        check_amount(change.amount)?;
        let key = idempotency_key(&change.idempotency_key)?;
        let balance = self
            .accounts
            .command(&change.account, op(change.amount), key)
            .await
            .map_err(|e| e.to_status("account"))?;
        Ok(Response::new(Balance {
            account: change.account,
            balance,
        }))
    }
}

fn check_amount(amount: i64) -> Result<(), Status> {
    if amount <= 0 {
        return Err(Status::invalid_argument(format!(
            "amount must be a positive number of cents, got {amount}"
        )));
    }
    Ok(())
}

/// The key, if given (empty: none).
fn idempotency_key(key: &str) -> Result<Option<&str>, Status> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Status::invalid_argument(format!(
            "idempotency_key is {} bytes; at most {MAX_IDEMPOTENCY_KEY_BYTES} are allowed",
            key.len()
        )));
    }
    Ok(Some(key).filter(|k| !k.is_empty()))
}

fn check_transfer(transfer: &TransferRequest) -> Result<(), Status> {
    check_account(&transfer.from)?;
    check_account(&transfer.to)?;
    if transfer.from == transfer.to {
        return Err(Status::invalid_argument(
            "from and to must be different accounts",
        ));
    }
    check_amount(transfer.amount)
}

/// A scheduled transfer's time: not beyond the runtime's timer limit, and, when `refuse_past`,
/// not in the past (by this node's clock).
fn check_time(at_ms: i64, now_ms: i64, refuse_past: bool) -> Result<(), Status> {
    if refuse_past && at_ms < now_ms {
        return Err(Status::invalid_argument(format!(
            "at_unix_ms {at_ms} is in the past (now {now_ms})"
        )));
    }
    if at_ms - now_ms > MAX_TIMER_DELAY.as_millis() as i64 {
        return Err(Status::invalid_argument(format!(
            "at_unix_ms {at_ms} is more than {} days ahead",
            MAX_TIMER_DELAY.as_secs() / 86_400
        )));
    }
    Ok(())
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A transfer id no other call gets: this process's start-unique time and a counter.
fn new_transfer_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "scheduled-{nanos:x}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn check_account(account: &str) -> Result<(), Status> {
    if account.is_empty() || account.len() > MAX_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "account must be 1 to {MAX_ID_BYTES} bytes, got {}",
            account.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl AccountsApi for AccountsService {
    async fn deposit(&self, request: Request<Change>) -> Result<Response<Balance>, Status> {
        self.change(request.into_inner(), |amount| Op::Deposit { amount })
            .await
    }

    async fn withdraw(&self, request: Request<Change>) -> Result<Response<Balance>, Status> {
        self.change(request.into_inner(), |amount| Op::Withdraw { amount })
            .await
    }

    async fn transfer(
        &self,
        request: Request<TransferRequest>,
    ) -> Result<Response<Balance>, Status> {
        let transfer = request.into_inner();
        check_transfer(&transfer)?;
        let key = idempotency_key(&transfer.idempotency_key)?;
        let op = Op::TransferOut {
            to: transfer.to,
            amount: transfer.amount,
            transfer_id: key.map(String::from),
        };
        let balance = self
            .accounts
            .command(&transfer.from, op, key)
            .await
            .map_err(|e| e.to_status("account"))?;
        Ok(Response::new(Balance {
            account: transfer.from,
            balance,
        }))
    }

    async fn schedule_transfer(
        &self,
        request: Request<TransferRequest>,
    ) -> Result<Response<Scheduled>, Status> {
        let transfer = request.into_inner();
        check_transfer(&transfer)?;
        let now_ms = unix_ms();
        let key = idempotency_key(&transfer.idempotency_key)?;
        // A keyed call may be the retry of one the account took before its time passed: the
        // account checks its time (`requested_ms`) and answers a retry with the first answer.
        check_time(transfer.at_unix_ms, now_ms, key.is_none())?;
        // The timer's name: the caller's key (a retry finds the same timer), else a new id.
        let transfer_id = key.map_or_else(new_transfer_id, String::from);
        let op = Op::ScheduleTransfer {
            to: transfer.to,
            amount: transfer.amount,
            at_ms: transfer.at_unix_ms,
            transfer_id: transfer_id.clone(),
            requested_ms: now_ms,
        };
        self.accounts
            .command(&transfer.from, op, key)
            .await
            .map_err(|e| match e {
                CommandError::Refused(why) if why.starts_with(SCHEDULED_IN_THE_PAST) => {
                    Status::invalid_argument(why)
                }
                e => e.to_status("account"),
            })?;
        Ok(Response::new(Scheduled { transfer_id }))
    }

    async fn get_balance(&self, request: Request<Account>) -> Result<Response<Balance>, Status> {
        let account = request.into_inner().account;
        check_account(&account)?;
        let (balance, _route) = self
            .accounts
            .ask(&account, ())
            .await
            .map_err(|e| e.to_status("account"))?;
        Ok(Response::new(Balance { account, balance }))
    }
}
