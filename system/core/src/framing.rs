//! Cutting a stream of messages into frames by bytes. Both directions of the Work
//! stream carry batches (assignments and acks down, pulls and submits up); a batch is
//! cut into frames whose encoded size stays within `limits.max_message_bytes`, so a
//! task whose payload and result are within their limits always gets through, however
//! much else is in flight. The transport measures its wire encoding; the simulator
//! its model of it; both cut with [`cut_by_size`].

/// Cuts `items` into consecutive groups, in order, each of whose summed `size` is at
/// most `limit`. An item larger than `limit` forms a group of its own (config
/// validation keeps payloads and results, plus framing, within the message limit, so
/// such an item means the caller measured wrong).
pub fn cut_by_size<T>(items: impl IntoIterator<Item = T>, limit: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut frames: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut used = 0usize;
    for item in items {
        let n = size(&item);
        if !current.is_empty() && used.saturating_add(n) > limit {
            frames.push(std::mem::take(&mut current));
            used = 0;
        }
        used = used.saturating_add(n);
        current.push(item);
    }
    if !current.is_empty() {
        frames.push(current);
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn six_megabyte_items_in_a_four_megabyte_limit_go_one_by_one() {
        let frames = cut_by_size(vec![1_000_000usize; 6], 4 << 20, |n| *n + 600);
        assert_eq!(frames.iter().map(Vec::len).collect::<Vec<_>>(), [4, 2]);
        let frames = cut_by_size(vec![3_000_000usize; 3], 4 << 20, |n| *n);
        assert_eq!(frames.len(), 3);
    }

    proptest! {
        #[test]
        fn frames_keep_every_item_in_order_and_stay_within_the_limit(
            sizes in proptest::collection::vec(0usize..5_000, 0..200), limit in 1usize..20_000,
        ) {
            let frames = cut_by_size(sizes.iter().copied().enumerate(), limit, |(_, n)| *n);
            let flat: Vec<(usize, usize)> = frames.iter().flatten().copied().collect();
            prop_assert_eq!(flat, sizes.iter().copied().enumerate().collect::<Vec<_>>());
            for frame in &frames {
                prop_assert!(!frame.is_empty());
                let total: usize = frame.iter().map(|(_, n)| n).sum();
                prop_assert!(total <= limit || frame.len() == 1, "{frame:?} over {limit}");
            }
            // Greedy: no two neighbours could have shared a frame.
            for pair in frames.windows(2) {
                let first: usize = pair[0].iter().map(|(_, n)| n).sum();
                prop_assert!(first + pair[1][0].1 > limit);
            }
        }
    }
}
