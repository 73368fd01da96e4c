//! Coins: transfers, payments to several recipients and transfers of any owned object.

use super::*;
use somatrain_protocol::transaction::{PayCoins, TransferCoin, TransferObjects};

pub(super) fn run(cx: &mut Context<'_>, kind: &TransactionKind) -> Rule<()> {
    let params = cx.o.system().params.clone();
    match kind {
        TransactionKind::TransferCoin(TransferCoin {
            coin,
            amount,
            recipient,
        }) => {
            if *amount == Some(0) {
                return fail(Kind::InvalidArguments, "amount must be positive");
            }
            match amount {
                Some(amount) => {
                    cx.debit(coin.id, Some(*amount), Kind::InsufficientCoinBalance)?;
                    cx.new_coin(*recipient, *amount);
                    cx.value_fee += bps(*amount, params.value_fee_bps);
                }
                None => {
                    let object = cx.o.object(&coin.id).expect("checked input");
                    cx.value_fee += bps(object.coin_balance().unwrap_or(0), params.value_fee_bps);
                    transfer(cx, coin.id, *recipient);
                }
            }
        }
        TransactionKind::PayCoins(PayCoins {
            coins,
            amounts,
            recipients,
        }) => {
            let amounts = amounts.clone().unwrap_or_default();
            let Some(first) = coins.first() else {
                return fail(Kind::InvalidArguments, "no coins to pay from");
            };
            let mut unique = BTreeSet::new();
            let mut total = 0u64;
            for coin in coins {
                if unique.insert(coin.id) {
                    total = total.saturating_add(cx.coin_balance(&coin.id));
                }
            }
            for coin in unique.iter().filter(|id| **id != first.id) {
                if *coin == cx.gas {
                    return fail(Kind::InvalidArguments, "the gas coin cannot be merged away");
                }
                cx.o.delete(*coin);
            }
            cx.set_coin(first.id, total);
            if amounts.is_empty() && recipients.len() == 1 {
                cx.value_fee += bps(total, params.value_fee_bps);
                transfer(cx, first.id, recipients[0]);
            } else {
                if amounts.len() != recipients.len() {
                    return fail(
                        Kind::InvalidArguments,
                        format!(
                            "{} amounts for {} recipients",
                            amounts.len(),
                            recipients.len()
                        ),
                    );
                }
                let sum = amounts.iter().fold(0u64, |a, b| a.saturating_add(*b));
                cx.debit(first.id, Some(sum), Kind::InsufficientCoinBalance)?;
                for (amount, recipient) in amounts.iter().zip(recipients) {
                    cx.new_coin(*recipient, *amount);
                }
                cx.value_fee += bps(sum, params.value_fee_bps);
            }
        }
        TransactionKind::TransferObjects(TransferObjects { objects, recipient }) => {
            for object in objects {
                transfer(cx, object.id, *recipient);
            }
        }
        _ => unreachable!("{} is dispatched to another family", kind.name()),
    }
    Ok(())
}

fn transfer(cx: &mut Context<'_>, id: ObjectId, recipient: Address) {
    let mut object = cx.o.object(&id).expect("checked input");
    object.owner = Owner::AddressOwner(recipient);
    cx.o.write(object);
}
