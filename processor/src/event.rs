//! Turning a Kafka record into a purchase, or into a reason it is malformed.

use prost::Message;
use proto::events::UserPurchase;

use crate::entity::UserId;

/// A validated purchase event, as read from one partition at one offset.
#[derive(Debug, Clone)]
pub struct Purchase {
    pub user_id: UserId,
    pub product: String,
    pub quantity: i64,
    pub price: i64,
}

impl Purchase {
    /// Σ contribution of this event to the user's amount spent.
    pub fn amount(&self) -> i64 {
        // Checked at decode time, so this cannot overflow.
        self.quantity * self.price
    }
}

/// Why a record cannot be processed; it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedRecord {
    #[error("record has no key (the key must be the user id)")]
    MissingKey,
    #[error("record key is not UTF-8")]
    KeyNotUtf8,
    #[error("record key is longer than {max} bytes")]
    KeyTooLong { max: usize },
    #[error("record has no value")]
    MissingValue,
    #[error("value is not a UserPurchase protobuf: {0}")]
    Undecodable(String),
    #[error("key '{key}' and the value's user_id '{user_id}' differ")]
    KeyMismatch { key: String, user_id: String },
    #[error("quantity {0} is negative")]
    NegativeQuantity(i64),
    #[error("price {0} is negative")]
    NegativePrice(i64),
    #[error("quantity {quantity} x price {price} overflows a 64-bit amount")]
    AmountOverflow { quantity: i64, price: i64 },
}

/// Longest accepted user id (the gRPC front end applies the same bound).
pub const MAX_USER_ID_BYTES: usize = 256;

/// Decodes and validates one record. The key is the user id (the partition key).
pub fn decode_record(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<Purchase, MalformedRecord> {
    let key = key
        .filter(|k| !k.is_empty())
        .ok_or(MalformedRecord::MissingKey)?;
    let key = std::str::from_utf8(key).map_err(|_| MalformedRecord::KeyNotUtf8)?;
    if key.len() > MAX_USER_ID_BYTES {
        return Err(MalformedRecord::KeyTooLong {
            max: MAX_USER_ID_BYTES,
        });
    }
    let value = value.ok_or(MalformedRecord::MissingValue)?;
    let purchase =
        UserPurchase::decode(value).map_err(|e| MalformedRecord::Undecodable(e.to_string()))?;
    if purchase.user_id != key {
        return Err(MalformedRecord::KeyMismatch {
            key: key.to_owned(),
            user_id: purchase.user_id,
        });
    }
    if purchase.quantity < 0 {
        return Err(MalformedRecord::NegativeQuantity(purchase.quantity));
    }
    if purchase.price < 0 {
        return Err(MalformedRecord::NegativePrice(purchase.price));
    }
    if purchase.quantity.checked_mul(purchase.price).is_none() {
        return Err(MalformedRecord::AmountOverflow {
            quantity: purchase.quantity,
            price: purchase.price,
        });
    }
    Ok(Purchase {
        user_id: UserId::from(key),
        product: purchase.product,
        quantity: purchase.quantity,
        price: purchase.price,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(user: &str, quantity: i64, price: i64) -> Vec<u8> {
        UserPurchase {
            user_id: user.into(),
            product: "cat t-shirt".into(),
            quantity,
            price,
        }
        .encode_to_vec()
    }

    #[test]
    fn a_valid_record_decodes() {
        let p = decode_record(Some(b"7"), Some(&encode("7", 2, 1548))).unwrap();
        assert_eq!(&*p.user_id, "7");
        assert_eq!(p.amount(), 3096);
    }

    #[test]
    fn each_defect_has_its_reason() {
        assert_eq!(
            decode_record(None, Some(&encode("7", 1, 1))).unwrap_err(),
            MalformedRecord::MissingKey
        );
        assert_eq!(
            decode_record(Some(b""), Some(&encode("7", 1, 1))).unwrap_err(),
            MalformedRecord::MissingKey
        );
        assert_eq!(
            decode_record(Some(&[0xff, 0xfe]), Some(b"")).unwrap_err(),
            MalformedRecord::KeyNotUtf8
        );
        assert_eq!(
            decode_record(Some(b"7"), None).unwrap_err(),
            MalformedRecord::MissingValue
        );
        assert!(matches!(
            decode_record(Some(b"7"), Some(b"\xff\xff\xff garbage")).unwrap_err(),
            MalformedRecord::Undecodable(_)
        ));
        assert!(matches!(
            decode_record(Some(b"8"), Some(&encode("7", 1, 1))).unwrap_err(),
            MalformedRecord::KeyMismatch { .. }
        ));
        assert_eq!(
            decode_record(Some(b"7"), Some(&encode("7", -1, 1))).unwrap_err(),
            MalformedRecord::NegativeQuantity(-1)
        );
        assert!(matches!(
            decode_record(Some(b"7"), Some(&encode("7", i64::MAX, 2))).unwrap_err(),
            MalformedRecord::AmountOverflow { .. }
        ));
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        assert!(matches!(
            decode_record(Some(long.as_bytes()), Some(&encode(&long, 1, 1))).unwrap_err(),
            MalformedRecord::KeyTooLong { .. }
        ));
    }
}
