"""Length buckets and padding rows: the rules encoding, training batches and dispatch share."""

import numpy as np

from sharcs_jax.data.padding import length_bucket_of, length_mask, pack_rows, pad_mask, pad_rows


def test_each_row_goes_to_the_shortest_bucket_that_holds_it():
  lengths = np.array([1, 8, 9, 16, 3])
  assert length_bucket_of(lengths, (8, 16)).tolist() == [0, 0, 1, 1, 0]
  assert length_bucket_of(lengths, (8, 16)).dtype == np.int32


def test_length_mask_marks_the_real_tokens():
  np.testing.assert_array_equal(length_mask(np.array([0, 2, 4]), 4),
                                [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def test_pad_rows_appends_zero_rows_and_keeps_full_batches():
  x = np.arange(6, dtype=np.int32).reshape(2, 3)
  padded = pad_rows(x, 4)
  np.testing.assert_array_equal(padded, [[0, 1, 2], [3, 4, 5], [0, 0, 0], [0, 0, 0]])
  assert padded.dtype == np.int32 and pad_rows(x, 2) is x


def test_padding_rows_attend_to_one_token_and_real_rows_are_unchanged():
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
  padded = pad_mask(mask, 4)
  np.testing.assert_array_equal(padded, [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 0, 0]])  # the caller's mask untouched


def test_pack_rows_right_pads_ragged_rows_in_order():
  ids, lengths = pack_rows([[5, 6, 7], [], [8], [9, 10, 11, 12]], 4, fill=3)
  np.testing.assert_array_equal(ids, [[5, 6, 7, 3], [3, 3, 3, 3], [8, 3, 3, 3], [9, 10, 11, 12]])
  assert lengths.tolist() == [3, 0, 1, 4] and ids.dtype == lengths.dtype == np.int32
  empty, none = pack_rows([], 4)
  assert empty.shape == (0, 4) and none.shape == (0,)
