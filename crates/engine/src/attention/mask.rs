//! Masks over the keys a step's queries may see: built from the layer's pattern and each row's
//! positions, never by the models.

use crate::attention::AttentionPattern;
use crate::decoder::state::kv_ring::position_at;

/// Where a batch's rows stand: what [`build`] needs to know about a step.
pub struct RowPositions<'a> {
    /// Positions each row had processed before this step.
    pub starts: &'a [usize],
    /// Real (unpadded) tokens of each row, at the end of its `seq_len` columns.
    pub new_tokens: &'a [usize],
    /// Columns of the left-padded batch.
    pub seq_len: usize,
}

/// The additive f32 mask, row-major `[batch, seq_len, ring_len + seq_len]`: 0 where a query may
/// see a key, -inf elsewhere. Keys are the first `ring_len` entries of the row's ring (ring
/// indexes, in a ring of `capacity`) followed by the step's own columns. A padding query sees
/// only itself, so that its softmax stays finite; its output is never used.
pub fn build(
    pattern: AttentionPattern,
    capacity: usize,
    ring_len: usize,
    rows: &RowPositions,
) -> Vec<f32> {
    let seq_len = rows.seq_len;
    let key_len = ring_len + seq_len;
    let mut mask = vec![f32::NEG_INFINITY; rows.starts.len() * seq_len * key_len];
    for (b, (&start, &count)) in rows.starts.iter().zip(rows.new_tokens).enumerate() {
        let pad = seq_len - count;
        for t in 0..seq_len {
            let mask_row = &mut mask[(b * seq_len + t) * key_len..][..key_len];
            if t < pad {
                mask_row[ring_len + t] = 0.0;
                continue;
            }
            let position = start + t - pad;
            for (index, entry) in mask_row[..ring_len].iter_mut().enumerate() {
                if position_at(index, start, capacity)
                    .is_some_and(|key| pattern.sees(position, key))
                {
                    *entry = 0.0;
                }
            }
            for column in pad..=t {
                if pattern.sees(position, start + column - pad) {
                    mask_row[ring_len + column] = 0.0;
                }
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(mask: &[f32], keys: usize) -> Vec<Vec<bool>> {
        mask.chunks(keys)
            .map(|q| q.iter().map(|&m| m == 0.0).collect())
            .collect()
    }

    #[test]
    fn decode_sees_exactly_the_last_window_of_positions() {
        // Positions 0..=6 processed in a ring of 3: it holds 6, 4, 5 at indexes 0, 1, 2.
        let rows = RowPositions {
            starts: &[7],
            new_tokens: &[1],
            seq_len: 1,
        };
        let mask = build(AttentionPattern::SlidingWindow(3), 3, 3, &rows);
        // The query at 7 sees 5, 6 (ring indexes 2 and 0) and itself; 4 (index 1) is too old.
        assert_eq!(visible(&mask, 4)[0], vec![true, false, true, true]);
    }

    #[test]
    fn left_padding_is_masked_and_positions_restart_per_row() {
        let rows = RowPositions {
            starts: &[0, 0],
            new_tokens: &[3, 1],
            seq_len: 3,
        };
        let v = visible(&build(AttentionPattern::Full, 64, 0, &rows), 3);
        assert_eq!(v[2], vec![true, true, true]);
        assert_eq!(v[5], vec![false, false, true]);
        assert_eq!(v[3], vec![true, false, false], "padding sees only itself");
    }

    #[test]
    fn a_chunk_boundary_hides_the_previous_chunk() {
        // Chunks of 4, positions 0..=5 processed, ring of 4 holds 4, 5, 2, 3; the query at 6
        // sees 4, 5 and itself.
        let rows = RowPositions {
            starts: &[6],
            new_tokens: &[1],
            seq_len: 1,
        };
        let mask = build(AttentionPattern::Chunked(4), 4, 4, &rows);
        assert_eq!(visible(&mask, 5)[0], vec![true, true, false, false, true]);
    }
}
