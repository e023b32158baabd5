//! The purchase entity: one per user, keyed by user id; its events are purchases, its state the
//! user's running totals.

use kafka_sharding::{Entity, Prost, Rejection};
use prost::Message;
use proto::events::UserPurchase;

/// The entity type of the sample (the runtime hosts it; see [`Entity`]).
pub struct Purchases;

/// A validated purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub product: String,
    pub quantity: i64,
    pub price: i64,
}

impl Purchase {
    /// What this purchase adds to the user's amount spent (checked at decode time: no overflow).
    pub fn amount(&self) -> i64 {
        self.quantity * self.price
    }
}

/// A user's running totals: the entity's state, and the answer to a query.
#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct Totals {
    #[prost(int64, tag = "1")]
    pub purchases: i64,
    #[prost(int64, tag = "2")]
    pub amount_spent: i64,
}

/// Why a record's value is not a purchase (the runtime has checked its key already).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedPurchase {
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

/// Decodes and validates a record value keyed by `user_id`.
pub fn decode_purchase(user_id: &str, value: Option<&[u8]>) -> Result<Purchase, MalformedPurchase> {
    let value = value.ok_or(MalformedPurchase::MissingValue)?;
    let purchase =
        UserPurchase::decode(value).map_err(|e| MalformedPurchase::Undecodable(e.to_string()))?;
    if purchase.user_id != user_id {
        return Err(MalformedPurchase::KeyMismatch {
            key: user_id.to_owned(),
            user_id: purchase.user_id,
        });
    }
    if purchase.quantity < 0 {
        return Err(MalformedPurchase::NegativeQuantity(purchase.quantity));
    }
    if purchase.price < 0 {
        return Err(MalformedPurchase::NegativePrice(purchase.price));
    }
    if purchase.quantity.checked_mul(purchase.price).is_none() {
        return Err(MalformedPurchase::AmountOverflow {
            quantity: purchase.quantity,
            price: purchase.price,
        });
    }
    Ok(Purchase {
        product: purchase.product,
        quantity: purchase.quantity,
        price: purchase.price,
    })
}

impl Entity for Purchases {
    type Event = Purchase;
    type State = Totals;
    /// The only question: the user's totals.
    type Query = ();
    type Reply = Totals;
    type Codec = Prost;

    fn decode(user_id: &str, value: Option<&[u8]>) -> Result<Purchase, Rejection> {
        Ok(decode_purchase(user_id, value)?)
    }

    fn apply(totals: &mut Totals, purchase: &Purchase) {
        totals.purchases += 1;
        totals.amount_spent = totals.amount_spent.saturating_add(purchase.amount());
    }

    fn query(totals: &Totals, _: &()) -> Totals {
        *totals
    }
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
        let p = decode_purchase("7", Some(&encode("7", 2, 1548))).unwrap();
        assert_eq!(p.amount(), 3096);
    }

    #[test]
    fn each_defect_has_its_reason() {
        assert_eq!(
            decode_purchase("7", None).unwrap_err(),
            MalformedPurchase::MissingValue
        );
        assert!(matches!(
            decode_purchase("7", Some(b"\xff\xff\xff garbage")).unwrap_err(),
            MalformedPurchase::Undecodable(_)
        ));
        assert!(matches!(
            decode_purchase("8", Some(&encode("7", 1, 1))).unwrap_err(),
            MalformedPurchase::KeyMismatch { .. }
        ));
        assert_eq!(
            decode_purchase("7", Some(&encode("7", -1, 1))).unwrap_err(),
            MalformedPurchase::NegativeQuantity(-1)
        );
        assert_eq!(
            decode_purchase("7", Some(&encode("7", 1, -1))).unwrap_err(),
            MalformedPurchase::NegativePrice(-1)
        );
        assert!(matches!(
            decode_purchase("7", Some(&encode("7", i64::MAX, 2))).unwrap_err(),
            MalformedPurchase::AmountOverflow { .. }
        ));
        let rejection = Purchases::decode("7", Some(&encode("7", -4, 1))).unwrap_err();
        assert!(rejection.0.contains("negative"), "{rejection}");
    }

    #[test]
    fn totals_count_purchases_and_sum_amounts() {
        let mut totals = Totals::default();
        for (quantity, price) in [(2, 100), (1, 5)] {
            let purchase = decode_purchase("7", Some(&encode("7", quantity, price))).unwrap();
            Purchases::apply(&mut totals, &purchase);
        }
        assert_eq!(
            Purchases::query(&totals, &()),
            Totals {
                purchases: 2,
                amount_spent: 205
            }
        );
    }
}
