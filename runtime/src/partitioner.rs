//! Key -> partition, exactly as Kafka's Java producer computes it for a keyed record:
//! `toPositive(murmur2(keyBytes)) % numPartitions`.
//!
//! This is the single home of the key -> shard mapping: shard id == partition, so an
//! entity lives on the node that consumes the partition its events are written to.
//! librdkafka's default partitioner (CRC32 `consistent_random`) does NOT agree with this;
//! Rust producers must set `partitioner=murmur2_random`.

/// Kafka's murmur2 (signed 32-bit result), as in `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);

    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }

    // The tail falls through 3 -> 2 -> 1 as in Java's switch; getting this wrong breaks
    // every key whose length is not a multiple of 4.
    let tail = blocks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }

    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Kafka's `Utils.toPositive`: clears the sign bit (not `abs`, which overflows on MIN).
pub fn to_positive(n: i32) -> u32 {
    (n & 0x7fff_ffff) as u32
}

/// The partition the Java producer (and librdkafka's `murmur2_random`) picks for `key`.
///
/// `partitions` must be non-zero; it comes from topic metadata, never from configuration.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    to_positive(murmur2(key)) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Kafka's own `UtilsTest` and the NOTES (signed results).
    #[test]
    fn murmur2_matches_java_signed_vectors() {
        let cases: &[(&str, i32)] = &[
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()), *expected, "murmur2({key:?})");
        }
    }

    #[test]
    fn murmur2_matches_java_unsigned_vectors() {
        let cases: &[(&str, u32)] = &[
            ("kafka", 0xd067_cf64),
            ("giberish123456789", 0x8f55_2b0c),
            ("", 0x106e_08d9),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key.as_bytes()) as u32,
                *expected,
                "murmur2({key:?})"
            );
        }
    }

    #[test]
    fn every_tail_length_is_covered() {
        // Lengths 4..=7 exercise a full block plus tails of 0..=3 bytes; each must differ
        // from the hash of its own prefix (a missing fall-through would collide often).
        let key = b"abcdefg";
        let hashes: Vec<i32> = (0..=key.len()).map(|n| murmur2(&key[..n])).collect();
        let mut unique = hashes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            hashes.len(),
            "prefix hashes collide: {hashes:?}"
        );
    }

    #[test]
    fn to_positive_clears_only_the_sign_bit() {
        assert_eq!(to_positive(i32::MIN), 0);
        assert_eq!(to_positive(-1), 0x7fff_ffff);
        assert_eq!(to_positive(5), 5);
    }

    #[test]
    fn partition_is_within_range_and_stable() {
        for n in 0..1000 {
            let key = n.to_string();
            let p = partition_for_key(key.as_bytes(), 128);
            assert!(p < 128);
            assert_eq!(p, partition_for_key(key.as_bytes(), 128));
        }
        // "foobar" -> -790332482 -> & 0x7fffffff = 1357151166 -> % 128 = 62
        assert_eq!(partition_for_key(b"foobar", 128), 1_357_151_166 % 128);
    }
}
