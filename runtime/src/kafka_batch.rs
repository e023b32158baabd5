//! Reading a consumer's records in batches, straight from librdkafka's queues.
//!
//! rust-rdkafka's `BaseConsumer::poll` hands out one record per call, each wrapped in a
//! librdkafka event and a freshly allocated `Arc` that is freed again when the record is
//! dropped. A restore reads millions of records on one thread, and in its profile that
//! per-record wrapping was a third of the thread (docs/BENCHMARKS.md); the group consumer's
//! poll loop paid the same per event. librdkafka's `rd_kafka_consume_batch_queue` returns up
//! to a batch of records per call from a queue, and advances the application positions as
//! `poll` does (transaction markers included), so `Consumer::position` keeps working.
//!
//! A batch read also serves whatever else waits in its queue, and serves a rebalance event
//! there by assigning without the application's callbacks. So an assign-only consumer (a
//! restore, a standby) reads its consumer queue directly ([`ConsumerReader`], which also takes
//! its log lines off that queue), while a group member reads a [`Queue`] of its own that its
//! partitions' records are forwarded to ([`Queue::take_partition`]), and leaves the consumer
//! queue, where rebalances and log lines arrive, to `poll`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

/// One record of a batch, borrowed from librdkafka until the batch is dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    /// Its timestamp in ms since the epoch, if it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: RawHeaders<'a>,
}

impl<'a> RawRecord<'a> {
    /// The same view of a record rust-rdkafka polled.
    pub fn of(message: &'a BorrowedMessage<'_>) -> Self {
        // SAFETY: the message stays valid (and unchanged) while `message` is borrowed.
        unsafe { Self::view(message.ptr()) }
    }

    /// A record without headers, from any message (tests build their records by hand).
    #[cfg(test)]
    pub fn detached(message: &'a impl rdkafka::Message) -> Self {
        Self {
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key(),
            payload: message.payload(),
            headers: RawHeaders::NONE,
        }
    }

    /// # Safety
    /// `message` is a valid librdkafka message that outlives `'a` and carries no error.
    // Inlined into the readers' loops, which the applications' crates instantiate: called
    // across crates, the view was written to the stack and read back per record (see
    // docs/BENCHMARKS.md, "The restore thread's own work, and the timer scan").
    #[inline]
    unsafe fn view(message: *const rdsys::rd_kafka_message_t) -> Self {
        let m = &*message;
        let bytes = |ptr: *mut c_void, len: usize| {
            (!ptr.is_null()).then(|| std::slice::from_raw_parts(ptr as *const u8, len))
        };
        let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        let timestamp = rdsys::rd_kafka_message_timestamp(message, &mut kind);
        Self {
            partition: m.partition,
            offset: m.offset,
            timestamp_ms: (timestamp >= 0).then_some(timestamp),
            key: bytes(m.key, m.key_len),
            payload: bytes(m.payload, m.len),
            headers: RawHeaders {
                message,
                _record: PhantomData,
            },
        }
    }
}

/// A record's headers, read from librdkafka on demand (most records have none, and librdkafka
/// parses them only when asked).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawHeaders<'a> {
    /// Null for a record without headers.
    message: *const rdsys::rd_kafka_message_t,
    _record: PhantomData<&'a ()>,
}

impl<'a> RawHeaders<'a> {
    #[cfg(test)]
    const NONE: Self = Self {
        message: std::ptr::null(),
        _record: PhantomData,
    };

    /// The headers in order. A header whose name is not UTF-8 is skipped: no header the runtime
    /// reads has such a name, and a record is not refused for a header someone else added.
    pub fn iter(self) -> impl Iterator<Item = Header<'a, &'a [u8]>> {
        let mut headers: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
        if !self.message.is_null() {
            // SAFETY: `message` is valid for 'a (see `RawRecord::view`); librdkafka parses
            // the headers once and keeps them with the message.
            let found = unsafe { rdsys::rd_kafka_message_headers(self.message, &mut headers) };
            if found != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                headers = std::ptr::null_mut();
            }
        }
        (0..)
            .map_while(move |idx| {
                if headers.is_null() {
                    return None;
                }
                let mut name: *const c_char = std::ptr::null();
                let mut value: *const c_void = std::ptr::null();
                let mut size = 0usize;
                // SAFETY: `headers` belongs to the message (valid for 'a); librdkafka fills the
                // three out-parameters for an index it has, or returns an error past the end.
                let got = unsafe {
                    rdsys::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size)
                };
                if got != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                    return None;
                }
                // SAFETY: a header's name is a NUL-terminated string and its value `size`
                // bytes (or null), both held by the message for 'a.
                let key = unsafe { CStr::from_ptr(name) }.to_str().ok();
                let value = (!value.is_null())
                    .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) });
                Some(key.map(|key| Header { key, value }))
            })
            .flatten()
    }
}

/// A reference to one of a consumer's librdkafka queues, released when dropped. Drop it before
/// the consumer it came from.
pub(crate) struct Queue {
    queue: *mut rdsys::rd_kafka_queue_t,
    client: *mut rdsys::rd_kafka_t,
}

// SAFETY: librdkafka's queues and client handles may be used from any thread.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

impl Queue {
    /// The consumer queue (`None` if the consumer was created without a `group.id`). Read it
    /// in batches only through a [`ConsumerReader`], which keeps librdkafka's log lines off it.
    pub fn of_consumer<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<Self> {
        let client = consumer.client().native_ptr();
        // SAFETY: the client is valid while `consumer` lives; the queue returned is a new
        // reference, released in `drop`.
        let queue = unsafe { rdsys::rd_kafka_queue_get_consumer(client) };
        (!queue.is_null()).then_some(Self { queue, client })
    }

    /// A new, empty queue for records forwarded to it.
    pub fn new_for<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<Self> {
        let client = consumer.client().native_ptr();
        // SAFETY: as above.
        let queue = unsafe { rdsys::rd_kafka_queue_new(client) };
        (!queue.is_null()).then_some(Self { queue, client })
    }

    /// Sends the records fetched from `topic`/`partition` to this queue instead of the consumer
    /// queue. Called for each partition before it is assigned, so none of its records goes the
    /// other way (the two queues' records would interleave out of order): librdkafka keeps an
    /// application's forwarding when the partition's fetch starts, and drops it when the fetch
    /// stops (a revocation), so every assignment forwards again. Returns false if librdkafka
    /// has no queue for the partition (its records then reach the consumer queue).
    pub fn take_partition(&self, topic: &str, partition: i32) -> bool {
        let Ok(topic) = CString::new(topic) else {
            return false;
        };
        // SAFETY: the client outlives this queue (see the type's docs); the partition's queue
        // is a new reference, released at once: the forwarding holds its own.
        unsafe {
            let source =
                rdsys::rd_kafka_queue_get_partition(self.client, topic.as_ptr(), partition);
            if source.is_null() {
                return false;
            }
            rdsys::rd_kafka_queue_forward(source, self.queue);
            rdsys::rd_kafka_queue_destroy(source);
        }
        true
    }

    /// How many operations wait in the queue (records, or the consumer queue's events).
    pub fn len(&self) -> usize {
        // SAFETY: the queue is valid until dropped.
        unsafe { rdsys::rd_kafka_queue_length(self.queue) }
    }

    /// Makes a read waiting on this queue return now (or the next one, if none waits).
    pub fn wake(&self) {
        // SAFETY: the queue is valid until dropped.
        unsafe { rdsys::rd_kafka_queue_yield(self.queue) }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: the reference taken at creation, released once. Partitions still forwarded
        // here keep the underlying queue alive; librdkafka drops what reaches it afterwards.
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue) }
    }
}

/// The log lines of a consumer whose consumer queue is read in batches, handed to its context
/// (a part of [`ConsumerReader`]).
///
/// rust-rdkafka has librdkafka put log lines (and errors, which librdkafka logs when no error
/// callback is set) on the client's main queue, which a consumer forwards to its consumer
/// queue. `rd_kafka_consume_batch_queue` serves them there with librdkafka's own default, a
/// line printed to stderr: an assign-only reader cut off from its broker printed one every few
/// seconds, past the node's rate limits. Redirected to a queue of their own, they reach the
/// client's context ([`crate::kafka_health::QuietContext`]: rate-limited, and quiet while the
/// outage is already said) when [`ClientLogs::serve`] is called after each read.
struct ClientLogs {
    queue: Queue,
}

impl ClientLogs {
    /// Sends `consumer`'s log lines to a queue of their own (`None` if librdkafka refuses).
    fn redirect<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<Self> {
        let queue = Queue::new_for(consumer)?;
        // SAFETY: both the client and the queue are valid; librdkafka forwards its internal
        // log queue to ours and holds its own reference to it.
        let redirected = unsafe { rdsys::rd_kafka_set_log_queue(queue.client, queue.queue) };
        (redirected == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then_some(Self { queue })
    }

    /// Hands every log line waiting to `context` (never waits).
    fn serve<C: ClientContext>(&self, context: &C) {
        serve_events(&self.queue, context);
    }
}

/// Hands the log lines and errors waiting in `queue` to `context`, and drops any other event
/// (never waits). Only for a queue that holds no records: a record taken here would be lost.
fn serve_events<C: ClientContext>(queue: &Queue, context: &C) {
    while queue.len() > 0 {
        // SAFETY: the queue is valid; an event returned is ours until destroyed below, and
        // the strings librdkafka points at live as long as the event.
        unsafe {
            let event = rdsys::rd_kafka_queue_poll(queue.queue, 0);
            if event.is_null() {
                return;
            }
            match rdsys::rd_kafka_event_type(event) {
                rdsys::RD_KAFKA_EVENT_LOG => {
                    let mut facility: *const c_char = std::ptr::null();
                    let mut line: *const c_char = std::ptr::null();
                    let mut level: c_int = 0;
                    if rdsys::rd_kafka_event_log(event, &mut facility, &mut line, &mut level) == 0
                        && !facility.is_null()
                        && !line.is_null()
                    {
                        context.log(
                            log_level(level),
                            &CStr::from_ptr(facility).to_string_lossy(),
                            &CStr::from_ptr(line).to_string_lossy(),
                        );
                    }
                }
                rdsys::RD_KAFKA_EVENT_ERROR => {
                    let code = RDKafkaErrorCode::from(rdsys::rd_kafka_event_error(event));
                    let reason = rdsys::rd_kafka_event_error_string(event);
                    let reason = if reason.is_null() {
                        std::borrow::Cow::Borrowed("")
                    } else {
                        CStr::from_ptr(reason).to_string_lossy()
                    };
                    context.error(KafkaError::Global(code), reason.trim());
                }
                _ => {}
            }
            rdsys::rd_kafka_event_destroy(event);
        }
    }
}

/// librdkafka's syslog-style level as rust-rdkafka's.
fn log_level(level: c_int) -> RDKafkaLogLevel {
    match level {
        i32::MIN..=0 => RDKafkaLogLevel::Emerg,
        1 => RDKafkaLogLevel::Alert,
        2 => RDKafkaLogLevel::Critical,
        3 => RDKafkaLogLevel::Error,
        4 => RDKafkaLogLevel::Warning,
        5 => RDKafkaLogLevel::Notice,
        6 => RDKafkaLogLevel::Info,
        _ => RDKafkaLogLevel::Debug,
    }
}

/// Reads an assign-only consumer's own queue in batches, its log lines handed to the
/// consumer's context after each read (see [`ClientLogs`]: read without that, the queue prints
/// them to stderr). Make it before assigning the consumer anything (`new` refuses otherwise),
/// so the lines logged since the consumer was created reach the context too; drop it before
/// the consumer.
pub(crate) struct ConsumerReader<C: ClientContext> {
    records: BatchReader,
    logs: ClientLogs,
    context: Arc<C>,
}

impl<C: ConsumerContext> ConsumerReader<C> {
    /// A reader of `consumer`'s queue, in batches of up to `capacity`; `what` names the
    /// consumer in the error if librdkafka refuses either queue.
    pub fn new(
        consumer: &BaseConsumer<C>,
        capacity: usize,
        what: &str,
    ) -> Result<Self, KafkaError> {
        // Lines logged before the redirect already wait on the consumer queue, where a batch
        // read would print them; they are handed over below, which is only safe while no
        // record can be there.
        if consumer.assignment()?.count() > 0 {
            return Err(KafkaError::ClientCreation(format!(
                "{what} was assigned partitions before its reader was made"
            )));
        }
        let queue = Queue::of_consumer(consumer)
            .ok_or_else(|| KafkaError::ClientCreation(format!("{what} has no consumer queue")))?;
        let logs = ClientLogs::redirect(consumer).ok_or_else(|| {
            KafkaError::ClientCreation(format!("cannot redirect the log lines of {what}"))
        })?;
        let context = consumer.context().clone();
        serve_events(&queue, context.as_ref());
        Ok(Self {
            records: BatchReader::new(Arc::new(queue), capacity),
            logs,
            context,
        })
    }

    /// As [`BatchReader::read`].
    pub fn read(&mut self, timeout: Duration) -> Batch<'_> {
        let batch = self.records.read(timeout);
        self.logs.serve(self.context.as_ref());
        batch
    }

    /// As [`BatchReader::read_now_or_first`].
    pub fn read_now_or_first(&mut self, max: usize, timeout: Duration) -> Batch<'_> {
        let batch = self.records.read_now_or_first(max, timeout);
        self.logs.serve(self.context.as_ref());
        batch
    }
}

/// Reads the records of a [`Queue`] in batches of up to `capacity`.
pub(crate) struct BatchReader {
    queue: Arc<Queue>,
    slots: Vec<*mut rdsys::rd_kafka_message_t>,
}

impl BatchReader {
    pub fn new(queue: Arc<Queue>, capacity: usize) -> Self {
        Self {
            queue,
            slots: vec![std::ptr::null_mut(); capacity.max(1)],
        }
    }

    /// Waits up to `timeout` until the batch is full or the time is up, and returns what came.
    pub fn read(&mut self, timeout: Duration) -> Batch<'_> {
        self.read_up_to(self.slots.len(), timeout)
    }

    /// Like `read`, with at most `max` records (1: returns as soon as one is there).
    pub fn read_up_to(&mut self, max: usize, timeout: Duration) -> Batch<'_> {
        let read = self.fill(max, timeout);
        Batch {
            messages: &self.slots[..read],
        }
    }

    /// The records there now, up to `max`; if there are none, waits up to `timeout` for the
    /// first to come (a tailing reader's latency is then the record's, not the timeout's).
    pub fn read_now_or_first(&mut self, max: usize, timeout: Duration) -> Batch<'_> {
        let read = match self.fill(max, Duration::ZERO) {
            0 => self.fill(1, timeout),
            read => read,
        };
        Batch {
            messages: &self.slots[..read],
        }
    }

    /// Reads up to `max` messages into the first slots; returns how many.
    fn fill(&mut self, max: usize, timeout: Duration) -> usize {
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let max = max.clamp(1, self.slots.len());
        // SAFETY: `slots` has room for `max` pointers, which librdkafka fills with the
        // messages it returns (each ours until destroyed, which `Batch::drop` does; the
        // borrow of `self` by a `Batch` keeps the slots from being refilled before that).
        let read = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.queue.queue,
                timeout_ms,
                self.slots.as_mut_ptr(),
                max,
            )
        };
        usize::try_from(read).unwrap_or(0)
    }
}

/// The records of one [`BatchReader::read`]; they go back to librdkafka when it is dropped.
pub(crate) struct Batch<'r> {
    messages: &'r [*mut rdsys::rd_kafka_message_t],
}

impl Batch<'_> {
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// What was read, in the order librdkafka delivered it.
    #[inline]
    pub fn records(&self) -> impl Iterator<Item = Read<'_>> {
        self.messages.iter().map(|&message| {
            // SAFETY: librdkafka returned this message and it is not destroyed before the
            // batch is dropped, which the borrow of `self` outlives.
            let message = unsafe { &*message };
            match message.err {
                // SAFETY: as above, and the message carries no error.
                rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => {
                    Read::Record(unsafe { RawRecord::view(message) })
                }
                rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF => Read::End {
                    partition: message.partition,
                    offset: message.offset,
                },
                err => Read::Failed(KafkaError::MessageConsumption(RDKafkaErrorCode::from(err))),
            }
        })
    }
}

/// One item of a [`Batch`].
#[derive(Debug)]
pub(crate) enum Read<'a> {
    Record(RawRecord<'a>),
    /// The partition's end was reached (with `enable.partition.eof`): `offset` is the position
    /// after its last record and transaction marker. A batch read moves the partition's
    /// application position (`Consumer::position`) one past it, as if it were a record: a
    /// reader that keeps positions takes this offset instead.
    End {
        partition: i32,
        offset: i64,
    },
    /// A failed fetch, say, in the place of its record.
    Failed(KafkaError),
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        for &message in self.messages {
            // SAFETY: each message of the batch is destroyed once, here, after every borrow of
            // it (through `records`) has ended.
            unsafe { rdsys::rd_kafka_message_destroy(message) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
    use rdkafka::{Offset, TopicPartitionList};

    /// librdkafka's mock cluster (standing in for the broker: what is tested is the reading)
    /// with a two-partition `topic`, and a producer to it.
    fn mock_topic(topic: &str) -> (MockCluster<'static, DefaultProducerContext>, BaseProducer) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(topic, 2, 1).unwrap();
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        (cluster, producer)
    }

    /// Every record comes back once, in partition order, with its key and payload (a
    /// tombstone's payload and a missing key as `None`), and the read positions reach the end:
    /// librdkafka's mock cluster stands in for the broker, what is tested is the reading.
    #[test]
    fn a_batch_read_returns_every_record_once_and_advances_the_positions() {
        const RECORDS: usize = 2_500;
        let (cluster, producer) = mock_topic("batches");
        for n in 0..RECORDS {
            let key = format!("k{n}");
            let value = format!("v{n}");
            let mut record = BaseRecord::<str, str>::to("batches").partition((n % 2) as i32);
            if n % 7 != 0 {
                record = record.key(&key);
            }
            if n % 5 != 0 {
                record = record.payload(&value);
            }
            producer.send(record).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "batch-reader")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..2 {
            tpl.add_partition_offset("batches", p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();

        let mut reader = BatchReader::new(Arc::new(Queue::of_consumer(&consumer).unwrap()), 100);
        // Per partition: (offset, key, payload) as text.
        type Seen = (i64, Option<String>, Option<String>);
        let mut seen: Vec<Vec<Seen>> = vec![Vec::new(); 2];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.iter().map(Vec::len).sum::<usize>() < RECORDS {
            assert!(std::time::Instant::now() < deadline, "records missing");
            let batch = reader.read(Duration::from_millis(50));
            assert!(batch.len() <= 100);
            for read in batch.records() {
                let Read::Record(record) = read else {
                    panic!("not a record: {read:?}");
                };
                let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
                seen[record.partition as usize].push((
                    record.offset,
                    text(record.key),
                    text(record.payload),
                ));
            }
        }
        for (p, records) in seen.iter().enumerate() {
            assert_eq!(records.len(), RECORDS / 2);
            for (i, (offset, key, payload)) in records.iter().enumerate() {
                let n = 2 * i + p;
                assert_eq!(*offset, i as i64);
                assert_eq!(key.clone(), (n % 7 != 0).then(|| format!("k{n}")));
                assert_eq!(payload.clone(), (n % 5 != 0).then(|| format!("v{n}")));
            }
        }
        drop(reader);
        let positions = consumer.position().unwrap();
        for p in 0..2 {
            let position = positions.find_partition("batches", p).unwrap().offset();
            assert_eq!(position, Offset::Offset((RECORDS / 2) as i64));
        }
    }

    /// A group member's partitions are forwarded to a queue of its own before they are
    /// assigned: every record arrives there, in order, with its headers and timestamp, and none
    /// through `poll` (which the consumer keeps for the group's events).
    #[test]
    fn forwarded_partitions_deliver_every_record_to_their_own_queue_and_none_to_poll() {
        const RECORDS: usize = 1_000;
        let (cluster, producer) = mock_topic("forwarded");
        for n in 0..RECORDS {
            let key = format!("k{n}");
            let mut record = BaseRecord::<str, str>::to("forwarded")
                .partition((n % 2) as i32)
                .key(&key)
                .payload("v")
                .timestamp(1_000 + n as i64);
            if n % 3 == 0 {
                let number = n.to_string();
                record = record.headers(
                    rdkafka::message::OwnedHeaders::new()
                        .insert(Header {
                            key: "n",
                            value: Some(number.as_str()),
                        })
                        .insert(Header::<&str> {
                            key: "empty",
                            value: None,
                        }),
                );
            }
            producer.send(record).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "forwarding")
            .create()
            .unwrap();
        let queue = Arc::new(Queue::new_for(&consumer).unwrap());
        let mut tpl = TopicPartitionList::new();
        for p in 0..2 {
            assert!(queue.take_partition("forwarded", p));
            tpl.add_partition_offset("forwarded", p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();

        let mut reader = BatchReader::new(queue.clone(), 64);
        let mut next = [0i64; 2];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while next.iter().sum::<i64>() < RECORDS as i64 {
            assert!(std::time::Instant::now() < deadline, "records missing");
            assert!(
                consumer.poll(Duration::ZERO).is_none(),
                "a record came through poll"
            );
            let batch = reader.read_up_to(
                if next[0] % 2 == 0 { 1 } else { 64 },
                Duration::from_millis(20),
            );
            for read in batch.records() {
                let Read::Record(record) = read else {
                    panic!("not a record: {read:?}");
                };
                let p = record.partition as usize;
                assert_eq!(record.offset, next[p], "in order, once each");
                next[p] += 1;
                let n = 2 * record.offset as usize + p;
                assert_eq!(record.key, Some(format!("k{n}").as_bytes()));
                assert_eq!(record.timestamp_ms, Some(1_000 + n as i64));
                let headers: Vec<(String, Option<Vec<u8>>)> = record
                    .headers
                    .iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect();
                let expected = if n.is_multiple_of(3) {
                    vec![
                        ("n".to_string(), Some(n.to_string().into_bytes())),
                        ("empty".to_string(), None),
                    ]
                } else {
                    Vec::new()
                };
                assert_eq!(headers, expected);
            }
        }
        assert_eq!(queue.len(), 0);
    }

    /// A context that keeps the log lines and errors it is given.
    #[derive(Default)]
    struct Lines(std::sync::Mutex<Vec<String>>);

    impl ClientContext for Lines {
        fn log(&self, _: RDKafkaLogLevel, facility: &str, line: &str) {
            self.0.lock().unwrap().push(format!("{facility} {line}"));
        }
        fn error(&self, error: KafkaError, reason: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("error {error}: {reason}"));
        }
    }
    impl ConsumerContext for Lines {}

    /// A consumer that cannot reach its broker, its records asked for from the start of
    /// `topic` partition 0 (not assigned yet: see [`ConsumerReader::new`]).
    fn unreachable_consumer() -> (BaseConsumer<Lines>, TopicPartitionList) {
        let consumer: BaseConsumer<Lines> = rdkafka::ClientConfig::new()
            // Nothing listens on port 1: every connection is refused.
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "logs")
            .create_with_context(Lines::default())
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("topic", 0, Offset::Beginning)
            .unwrap();
        (consumer, tpl)
    }

    fn refused(consumer: &BaseConsumer<Lines>) -> bool {
        consumer
            .context()
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("127.0.0.1:1") && (l.contains("refused") || l.contains("down")))
    }

    /// A reader of its consumer queue whose broker cannot be reached: librdkafka's complaints
    /// reach the consumer's context (which rate-limits them), not stderr, where
    /// `rd_kafka_consume_batch_queue` would print them without the redirect.
    #[test]
    fn a_consumer_readers_log_lines_reach_its_context() {
        let (consumer, tpl) = unreachable_consumer();
        let mut reader = ConsumerReader::new(&consumer, 10, "the test consumer").unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !refused(&consumer) && std::time::Instant::now() < deadline {
            assert!(reader.read(Duration::from_millis(100)).is_empty());
        }
        assert!(
            refused(&consumer),
            "no connection failure reached the context: {:?}",
            consumer.context().0.lock().unwrap()
        );
    }

    /// The lines a consumer logs before its reader exists wait on its consumer queue (where a
    /// batch read would print them): making the reader hands them to the context at once.
    #[test]
    fn lines_logged_before_the_reader_was_made_reach_the_context_too() {
        let (consumer, tpl) = unreachable_consumer();
        let consumer_queue = Queue::of_consumer(&consumer).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while consumer_queue.len() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            consumer_queue.len() > 0,
            "nothing was logged before the reader"
        );
        assert!(consumer.context().0.lock().unwrap().is_empty());
        let _reader = ConsumerReader::new(&consumer, 10, "the test consumer").unwrap();
        assert!(
            !consumer.context().0.lock().unwrap().is_empty(),
            "the waiting lines were not handed over"
        );
        assert_eq!(consumer_queue.len(), 0);
        // Once records may wait on the queue, a reader would drop them: it is refused.
        consumer.assign(&tpl).unwrap();
        let refused = ConsumerReader::new(&consumer, 10, "the test consumer");
        assert!(
            matches!(&refused, Err(KafkaError::ClientCreation(m)) if m.contains("assigned")),
            "{:?}",
            refused.err()
        );
    }
}
