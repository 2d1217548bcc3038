//! The arithmetic of partitioned consumer groups (issue 19): which partition a key belongs to,
//! computed exactly as nats-server's `partition()` subject transform computes it, and how a
//! group's partitions are spread over its live instances.
//!
//! The groups themselves are in `partition/group.rs` (`docs/design/partitions.md` has the design they
//! follow); these two pure functions are what everything else rests on: the server routes each
//! message to a partition and natty must agree with it to the bit, and every instance must work
//! out the same owners from the same membership without talking.

use std::collections::BTreeMap;

pub(crate) mod group;

/// The subject a message of a partitioned group was published to: its stored subject without
/// the leading partition token (`3.accounts.42.posted` → `accounts.42.posted`).
pub(crate) fn published_subject(stored: &async_nats::Subject) -> async_nats::Subject {
    match stored.split_once('.') {
        Some((_, published)) => async_nats::Subject::from(published),
        None => stored.clone(),
    }
}
pub(crate) mod membership;

/// The partition nats-server's `{{partition(n, ...)}}` transform gives a message whose selected
/// wildcard tokens are `tokens`: FNV-1a (32 bits) over the tokens concatenated without a
/// separator, modulo `partitions` (`getHashPartition` in `server/subject_transform.go`).
/// Zero partitions give 0, as the server does.
///
/// Concatenation without a separator means that, keyed on two tokens, `a.bc` and `ab.c` land
/// together: the server's choice, kept here.
///
/// # Examples
///
/// A stream whose subject transform is `orders.*` → `orders.{{wildcard(1)}}.{{partition(8,1)}}`
/// stores a message published to `orders.north` as `orders.north.<p>` with:
///
/// ```
/// let p = natty_runtime::partition::partition_of(&["north"], 8);
/// assert!(p < 8);
/// ```
pub fn partition_of(tokens: &[&str], partitions: u32) -> u32 {
    if partitions == 0 {
        return 0;
    }
    let hash = tokens
        .iter()
        .flat_map(|token| token.bytes())
        .fold(FNV_OFFSET, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(FNV_PRIME)
        });
    hash % partitions
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// Who owns each of `partitions` partitions, given the live `members` and who holds each
/// partition now (`current[k]`, `None` when nobody does; a holder that is not a live member
/// counts as nobody). Every instance that sees the same members and holders computes the same
/// answer, whatever order it lists them in.
///
/// - **Balanced**: each member gets ⌊N/M⌋ or ⌈N/M⌉ partitions. The ⌈N/M⌉ quotas go first to
///   the members that already hold the most (ties by name), so that as few as possible move.
/// - **Sticky**: a member keeps what it holds up to its quota; one above its quota gives up its
///   highest-numbered partitions.
/// - **Minimal**: only partitions that must move do — a join moves exactly the newcomer's
///   share (8 partitions, 3 → 4 members: 2 move), a leave only the leaver's.
/// - Free partitions go, lowest first, to the member under its quota with the highest
///   rendezvous hash of (partition, member): spread evenly, and the same on every instance.
///
/// Returns one owner per partition, or an empty list when there are no members.
pub(crate) fn assign<'a>(partitions: u32, members: &[&'a str], current: &[Option<&str>]) -> Vec<&'a str> {
    let mut members: Vec<&'a str> = members.to_vec();
    members.sort_unstable();
    members.dedup();
    if members.is_empty() {
        return Vec::new();
    }
    let n = partitions as usize;
    // What each live member holds now, partitions in ascending order.
    let mut held: BTreeMap<&'a str, Vec<usize>> = members.iter().map(|&member| (member, Vec::new())).collect();
    for (partition, holder) in current.iter().enumerate().take(n) {
        if let Some(holder) = holder {
            if let Some((_, partitions)) = held.iter_mut().find(|(member, _)| **member == *holder) {
                partitions.push(partition);
            }
        }
    }
    // Quotas: the larger ones to the members holding most, ties by name.
    let (base, larger) = (n / members.len(), n % members.len());
    let mut by_holding = members.clone();
    by_holding.sort_by(|a, b| held[b].len().cmp(&held[a].len()).then(a.cmp(b)));
    let quota: BTreeMap<&'a str, usize> = by_holding
        .iter()
        .enumerate()
        .map(|(rank, &member)| (member, base + usize::from(rank < larger)))
        .collect();
    let mut owners: Vec<Option<&'a str>> = vec![None; n];
    for (&member, partitions) in &held {
        // Kept: the lowest-numbered, up to the quota; the rest is given up.
        for &partition in partitions.iter().take(quota[member]) {
            owners[partition] = Some(member);
        }
    }
    let mut count: BTreeMap<&'a str, usize> = held
        .iter()
        .map(|(&member, p)| (member, p.len().min(quota[member])))
        .collect();
    for (partition, owner) in owners.iter_mut().enumerate() {
        if owner.is_some() {
            continue;
        }
        let chosen = members
            .iter()
            .copied()
            .filter(|member| count[member] < quota[member])
            .max_by_key(|member| (rendezvous(partition as u32, member), std::cmp::Reverse(*member)))
            .expect("the quotas add up to the partitions");
        *count.get_mut(chosen).expect("a member") += 1;
        *owner = Some(chosen);
    }
    owners
        .into_iter()
        .map(|owner| owner.expect("every partition assigned"))
        .collect()
}

/// The rendezvous weight of `member` for `partition`: FNV-1a over both, then mixed
/// (splitmix64's finaliser) so that nearby inputs give unrelated weights. Fixed arithmetic, not
/// `std`'s randomly seeded hasher: every instance must compute the same.
fn rendezvous(partition: u32, member: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in member.bytes().chain(partition.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partitions per member.
    fn counts<'a>(owners: &[&'a str]) -> BTreeMap<&'a str, usize> {
        let mut counts = BTreeMap::new();
        for owner in owners {
            *counts.entry(*owner).or_default() += 1;
        }
        counts
    }

    fn moved(before: &[&str], after: &[&str]) -> usize {
        before.iter().zip(after).filter(|(a, b)| a != b).count()
    }

    fn held<'a>(owners: &[&'a str]) -> Vec<Option<&'a str>> {
        owners.iter().map(|owner| Some(*owner)).collect()
    }

    #[test]
    fn fnv1a_matches_known_values() {
        // FNV-1a 32 reference values (the empty input is the offset basis).
        assert_eq!(partition_of(&[], u32::MAX), 0x811c_9dc5);
        assert_eq!(partition_of(&["a"], u32::MAX), 0xe40c_292c);
        assert_eq!(partition_of(&["foobar"], u32::MAX), 0xbf9c_f968);
        // Tokens are concatenated without a separator, as the server does.
        assert_eq!(partition_of(&["foo", "bar"], 97), partition_of(&["foobar"], 97));
        assert_eq!(partition_of(&["x"], 0), 0);
    }

    #[test]
    fn every_member_gets_its_share_and_every_partition_an_owner() {
        let pool = ["a", "b", "c", "d", "e", "f", "g"];
        for partitions in [1u32, 2, 3, 7, 8, 16, 31, 64] {
            for size in 1..=pool.len() {
                let members = &pool[..size];
                let owners = assign(partitions, members, &[]);
                assert_eq!(owners.len(), partitions as usize);
                let counts = counts(&owners);
                let low = partitions as usize / size;
                let high = low + usize::from(partitions as usize % size > 0);
                for member in members {
                    let got = counts.get(member).copied().unwrap_or(0);
                    assert!(
                        got == low || got == high,
                        "{partitions} over {size}: {member} has {got}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_answer_does_not_depend_on_who_computes_it() {
        let current = [
            Some("b"),
            None,
            Some("ghost"),
            Some("a"),
            None,
            Some("c"),
            Some("c"),
            Some("c"),
        ];
        let one = assign(8, &["a", "b", "c", "d"], &current);
        let other = assign(8, &["d", "c", "b", "a", "a"], &current);
        assert_eq!(one, other);
        assert_eq!(assign(8, &[], &current), Vec::<&str>::new());
    }

    #[test]
    fn a_join_moves_only_the_newcomers_share() {
        let three = assign(8, &["a", "b", "c"], &[]);
        let four = assign(8, &["a", "b", "c", "d"], &held(&three));
        assert_eq!(moved(&three, &four), 2, "{three:?} -> {four:?}");
        assert_eq!(counts(&four)["d"], 2);
        // Every move goes to the newcomer.
        assert!(three.iter().zip(&four).all(|(was, now)| was == now || *now == "d"));
        for partitions in [4u32, 12, 30, 64] {
            let before = assign(partitions, &["a", "b", "c"], &[]);
            let after = assign(partitions, &["a", "b", "c", "d"], &held(&before));
            assert_eq!(moved(&before, &after), counts(&after)["d"], "{partitions} partitions");
        }
    }

    #[test]
    fn a_leave_moves_only_the_leavers_partitions() {
        for partitions in [8u32, 9, 30] {
            let four = assign(partitions, &["a", "b", "c", "d"], &[]);
            let three = assign(partitions, &["a", "b", "d"], &held(&four));
            for (was, now) in four.iter().zip(&three) {
                assert!(was == now || *was == "c", "{was} lost a partition to {now}");
            }
            assert!(!three.contains(&"c"));
        }
    }

    #[test]
    fn a_stable_membership_changes_nothing() {
        let owners = assign(16, &["a", "b", "c"], &[]);
        assert_eq!(assign(16, &["a", "b", "c"], &held(&owners)), owners);
    }

    #[test]
    fn free_partitions_spread_over_members_not_in_blocks() {
        // Rendezvous, not contiguous ranges: with 4 members and 32 partitions, each member's
        // partitions are not one run (which a restart of one member would move all at once).
        let owners = assign(32, &["a", "b", "c", "d"], &[]);
        let runs = owners.windows(2).filter(|pair| pair[0] != pair[1]).count();
        assert!(runs > 8, "{owners:?}");
    }
}
