//! Reading an assign-only consumer's records in batches, straight from librdkafka's queue.
//!
//! rust-rdkafka's `BaseConsumer::poll` hands out one record per call, each wrapped in a
//! librdkafka event and a freshly allocated `Arc` that is freed again when the record is
//! dropped. A restore reads millions of records on one thread, and in its profile that
//! per-record wrapping was a third of the thread (docs/BENCHMARKS.md). librdkafka's
//! `rd_kafka_consume_batch_queue` returns up to a batch of records per call from the same
//! queue, and advances the application positions as `poll` does (transaction markers
//! included), so `Consumer::position` keeps working.
//!
//! Only for consumers that are assigned partitions (`assign`), never for a group member: a
//! group consumer's rebalance events are delivered through `poll`.

use std::marker::PhantomData;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// One record of a batch, borrowed from librdkafka until the batch is dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

impl<'a> RawRecord<'a> {
    /// The same view of a record rust-rdkafka polled.
    pub fn of(message: &'a impl rdkafka::Message) -> Self {
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
        }
    }
}

/// Reads the records of `consumer`'s queue in batches of up to `capacity`.
pub(crate) struct BatchReader<'c> {
    queue: *mut rdsys::rd_kafka_queue_t,
    slots: Vec<*mut rdsys::rd_kafka_message_t>,
    _consumer: PhantomData<&'c ()>,
}

impl<'c> BatchReader<'c> {
    /// `None` if the consumer has no consumer queue (it was created without a `group.id`).
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>, capacity: usize) -> Option<Self> {
        // SAFETY: the client pointer is valid while `consumer` lives, which the lifetime 'c
        // ties the reader to; the queue returned is a new reference, released in `drop`.
        let queue = unsafe { rdsys::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        (!queue.is_null()).then(|| Self {
            queue,
            slots: vec![std::ptr::null_mut(); capacity.max(1)],
            _consumer: PhantomData,
        })
    }

    /// Waits up to `timeout` until the batch is full or the time is up, and returns what came.
    pub fn read(&mut self, timeout: Duration) -> Batch<'_> {
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `slots` has room for `slots.len()` pointers, which librdkafka fills with the
        // messages it returns (each ours until destroyed, which `Batch::drop` does).
        let read = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.queue,
                timeout_ms,
                self.slots.as_mut_ptr(),
                self.slots.len(),
            )
        };
        Batch {
            messages: &self.slots[..usize::try_from(read).unwrap_or(0)],
        }
    }
}

impl Drop for BatchReader<'_> {
    fn drop(&mut self) {
        // SAFETY: the reference taken in `new`, released once.
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue) }
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

    /// The records in the order librdkafka delivered them; an error (a failed fetch, say) is
    /// returned in the place of its record.
    pub fn records(&self) -> impl Iterator<Item = Result<RawRecord<'_>, KafkaError>> {
        self.messages.iter().map(|&message| {
            // SAFETY: librdkafka returned this message and it is not destroyed before the
            // batch is dropped, which the borrow of `self` outlives.
            let message = unsafe { &*message };
            if message.err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::from(
                    message.err,
                )));
            }
            // SAFETY: as above; librdkafka's key and payload are `len` bytes or null.
            let bytes = |ptr: *mut std::ffi::c_void, len: usize| {
                (!ptr.is_null())
                    .then(|| unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
            };
            Ok(RawRecord {
                partition: message.partition,
                offset: message.offset,
                key: bytes(message.key, message.key_len),
                payload: bytes(message.payload, message.len),
            })
        })
    }
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
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};

    /// Every record comes back once, in partition order, with its key and payload (a
    /// tombstone's payload and a missing key as `None`), and the read positions reach the end:
    /// librdkafka's mock cluster stands in for the broker, what is tested is the reading.
    #[test]
    fn a_batch_read_returns_every_record_once_and_advances_the_positions() {
        const RECORDS: usize = 2_500;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("batches", 2, 1).unwrap();
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
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

        let mut reader = BatchReader::new(&consumer, 100).unwrap();
        // Per partition: (offset, key, payload) as text.
        type Seen = (i64, Option<String>, Option<String>);
        let mut seen: Vec<Vec<Seen>> = vec![Vec::new(); 2];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.iter().map(Vec::len).sum::<usize>() < RECORDS {
            assert!(std::time::Instant::now() < deadline, "records missing");
            let batch = reader.read(Duration::from_millis(50));
            assert!(batch.len() <= 100);
            for record in batch.records() {
                let record = record.unwrap();
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
}
