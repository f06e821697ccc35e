"""Caption-anchored clips, scene negatives and caption tags: the EgoVLP / SViTT-Ego options of
data_pipelines.pretrain.ShardSource (data.caption_clips, scene_negative_window, num_nouns,
num_verbs), mixed into it as `CaptionClips`, which reads its cfg, modalities, train, eval_crops,
random_flip, num_nouns, num_verbs, caption_clips, scene_negative_window and `_captions`.

EgoVLP / SViTT-Ego options (config.data; docs/DATA.md):
  num_nouns, num_verbs (0: off): the batch carries `noun` [B, num_nouns] and `verb` [B, num_verbs]
    float32 multi-hots of the chosen caption's class tags (the first narration when K > 1). A
    record with a class index >= num_* is data that disagrees with the config: skipped and
    counted (noun_out_of_range / verb_out_of_range), or fatal with on_bad_input='fatal'. When the
    shards' folder holds the converter's taxonomy.json, a config whose sizes differ is refused.
  caption_clips (False): a clip is anchored on ONE caption, drawn uniformly among the record's
    non-empty captions (records without one: skipped, counted as no_captions): T frames spread over
    the caption's [start, end], one at a random point of each of T equal segments in training, at
    the segment centres in evaluation (EgoVLP's 'rand' / 'uniform'), whatever data.fps says; then
    the usual crop, flip and jitter. Text: that caption first, then (K > 1) the captions nearest
    it in time order. Evaluation gives one such clip per record (data.eval_clips is not used) in
    data.eval_crops crops. Audio is not cut over caption spans: refused with 'audio' in
    data.modalities.
  scene_negative_window (0: off; EgoVLP: 60 s; needs caption_clips; training only): the batch also
    carries the clip of another caption j of the same record whose time ((start + end) / 2, close to
    EgoClip's narration_time) lies within ±window of the chosen caption's, j drawn uniformly among
    those: neg_video [B, T, S, S, 3], neg_text [B, K, W], neg_noun / neg_verb, neg_mask [B] float32
    (0, with zeros in the other neg_ fields, where the record has no such caption). As in
    vatt_jax.losses.egonce.scene_negative_index.
Every draw is a stateless function of (seed, element index), like the rest of this pipeline.
"""

from __future__ import annotations

import tensorflow as tf

from data_pipelines import video as video_ops

tf.config.set_visible_devices([], 'GPU')  # TensorFlow never takes an accelerator from JAX

# Why ShardSource._process rejects an element (its '_reject' code), as named in `counts`; 0 keeps it.
REJECT_REASONS = {1: 'noun_out_of_range', 2: 'verb_out_of_range', 3: 'no_captions'}
NOUN_OUT_OF_RANGE, VERB_OUT_OF_RANGE, NO_CAPTIONS = 1, 2, 3


class CaptionClips:
  """The caption-anchored sampling of a ShardSource (module docstring)."""

  def _rejection(self, ex):
    """'_reject' (a REJECT_REASONS code, 0: keep) and '_reject_value' (the class index past the
    config, or −1) of a record: a tag class past data.num_nouns / num_verbs on any caption, or
    (caption_clips) no non-empty caption to anchor a clip on. Checked in that order."""
    reject, value = tf.constant(0), tf.constant(-1, tf.int64)
    checks = []
    if self.num_nouns:
      checks.append((NOUN_OUT_OF_RANGE, ex['caption_noun'], self.num_nouns))
    if self.num_verbs:
      checks.append((VERB_OUT_OF_RANGE, ex['caption_verb'], self.num_verbs))
    if self.caption_clips:
      nonempty = tf.strings.length(tf.strings.strip(ex['captions'])) > 0
      reject = tf.where(tf.reduce_any(nonempty), reject, NO_CAPTIONS)
    for code, tags, limit in reversed(checks):  # the first check that fails names the reason
      largest = tf.reduce_max(tf.concat([tf.reshape(tags, [-1]), tf.constant([-1], tf.int64)], 0))
      reject = tf.where(largest >= limit, code, reject)
      value = tf.where(largest >= limit, largest, value)
    return {'_reject': reject, '_reject_value': value, '_media_id': ex['media_id']}

  def _tags(self, caps, chosen, present, prefix: str = ''):
    """noun [num_nouns] / verb [num_verbs] f32 multi-hots of caption `chosen` (zeros unless
    `present`), for the sizes that are > 0."""
    out = {}
    for key, size in (('noun', self.num_nouns), ('verb', self.num_verbs)):
      if size:
        row = caps[f'caption_{key}'][chosen]
        # Records with a class past `size` are rejected (_rejection); clipped here only so that
        # one_hot never sees them.
        hot = tf.one_hot(tf.boolean_mask(row, (row >= 0) & (row < size)), size, dtype=tf.float32)
        hot = tf.reduce_max(tf.concat([hot, tf.zeros([1, size])], 0), axis=0)
        out[prefix + key] = hot * tf.cast(present, tf.float32)
    return out

  # ---- caption-anchored clips and scene negatives (data.caption_clips) ----------------------
  def _caption_clip(self, ex, seeds):
    """The fields of a clip anchored on one caption, drawn uniformly (module docstring), and of
    its scene negative (training, data.scene_negative_window > 0)."""
    caps, count, nonempty = self._captions(ex)
    present = count > 0  # records without a caption are rejected (_rejection)
    # seeds[0] (the clip start's outside this mode) is split for this mode's draws; seeds[1]
    # augments the clip as in the other mode. Not stateless_fold_in: its seeds [u, 1], [u, 2], …
    # differ only in the counter word, and Philox's first draws from them are correlated.
    choice, offsets, negative_choice, negative_offsets, negative_augment = tf.unstack(
      tf.random.experimental.stateless_split(seeds[0], 5), num=5
    )
    chosen = tf.random.stateless_uniform([], choice, 0, tf.maximum(count, 1), dtype=tf.int32)
    out = self._anchored(ex, caps, count, chosen, offsets, seeds[1], present)
    out['_empty_captions'] = tf.reduce_sum(tf.cast(~nonempty, tf.int32))
    if self.train and self.scene_negative_window > 0:
      other, has_other = self._scene_negative(caps, count, chosen, negative_choice)
      negative = self._anchored(
        ex, caps, count, other, negative_offsets, negative_augment, has_other, prefix='neg_'
      )
      for key in ('text_mask', 'video_mask'):
        negative.pop('neg_' + key, None)
      out.update(negative)
      out['neg_mask'] = tf.cast(has_other, tf.float32)
    return out

  def _anchored(self, ex, caps, count, chosen, offset_seed, augment_seed, present, prefix=''):
    """video (train [T, S, S, 3], eval [c, T, S, S, 3]) over caption `chosen`'s span, its text
    [K] (the caption, then the captions nearest it in time order) and tags; zeros and '' unless
    `present` (the video is then not decoded)."""
    cfg = self.cfg
    out = self._tags(caps, chosen, present, prefix)
    if 'video' in self.modalities:
      crops = 1 if self.train else self.eval_crops
      shape = [cfg.num_frames, cfg.frame_size, cfg.frame_size, 3]
      shape = shape if self.train else [crops, *shape]
      start, end = caps['caption_start'][chosen], caps['caption_end'][chosen]
      out[prefix + 'video'] = tf.cond(
        present,
        lambda: self._span_clip(ex, start, end, offset_seed, augment_seed),
        lambda: tf.zeros(shape, tf.float32),
      )
      out[prefix + 'video_mask'] = tf.ones([], tf.float32)
    if 'text' in self.modalities:
      text = tf.gather(caps['captions'], self._nearest_captions(caps, count, chosen))
      out[prefix + 'text'] = tf.where(present, text, '')
      out[prefix + 'text_mask'] = tf.cast(present, tf.float32)
    return out

  def _nearest_captions(self, caps, count, chosen):
    """[K] caption indices: `chosen`, then the others nearest it in time order (start times;
    the earlier first on a tie), `chosen` repeated when there are fewer than K."""
    order = tf.argsort(caps['caption_start'], stable=True)  # time position → caption
    position = tf.argmax(tf.cast(tf.equal(order, chosen), tf.int32), output_type=tf.int32)
    positions = tf.range(tf.shape(order)[0])
    key = 2 * tf.abs(positions - position) - tf.cast(positions < position, tf.int32)
    nearest = tf.argsort(key, stable=True)  # nearest[0] is `position` (key 0)
    k = tf.range(self.cfg.num_narrations)
    return tf.gather(order, tf.gather(nearest, tf.where(k < count, k, 0)))

  def _span_clip(self, ex, start, end, offset_seed, augment_seed):
    """T frames over [start, end] s: frame k at a random point (train) or the centre (eval) of the
    k-th of T equal segments, shown as stored at that time; then augmented (train) or the
    data.eval_crops crops (eval, [c, T, S, S, 3])."""
    cfg = self.cfg
    num_stored = tf.shape(ex['frames'])[0]
    # A record without frames fails here: dropped and counted, as _video does.
    tf.debugging.assert_greater(num_stored, 0, message='record without frames')
    start = tf.clip_by_value(start, 0.0, ex['duration'])
    length = tf.maximum(tf.clip_by_value(end, 0.0, ex['duration']) - start, 0.0)
    if self.train:
      within = tf.random.stateless_uniform([cfg.num_frames], offset_seed)
    else:
      within = tf.fill([cfg.num_frames], 0.5)
    segment = tf.range(cfg.num_frames, dtype=tf.float32)
    times = start + (segment + within) * length / cfg.num_frames
    index = tf.cast(tf.floor(times * ex['frame_rate']), tf.int32)
    jpegs = tf.gather(ex['frames'], tf.clip_by_value(index, 0, num_stored - 1))
    if self.train:
      return video_ops.decode_clip(
        jpegs, cfg.frame_size, augment_seed, train=True, area_range=cfg.crop_area_range,
        aspect_range=cfg.crop_aspect_range, flip=self.random_flip,
      )  # fmt: skip
    windows = video_ops.eval_windows(tf.image.extract_jpeg_shape(jpegs[0]), self.eval_crops)
    return tf.stack([
      video_ops.decode_clip(jpegs, cfg.frame_size, augment_seed, train=False, window=windows[c])
      for c in range(self.eval_crops)
    ])  # fmt: skip

  def _scene_negative(self, caps, count, chosen, seed):
    """(j, whether there is one): another caption of the record whose time ((start + end) / 2)
    lies within ±scene_negative_window of caption `chosen`'s, drawn uniformly among them."""
    times = tf.cast(caps['caption_start'], tf.float64) + tf.cast(caps['caption_end'], tf.float64)
    times = times / 2
    others = tf.range(tf.shape(times)[0]) != chosen
    near = others & (tf.abs(times - times[chosen]) <= self.scene_negative_window) & (count > 0)
    candidates = tf.cast(tf.where(near)[:, 0], tf.int32)
    num = tf.shape(candidates)[0]
    pick = tf.random.stateless_uniform([], seed, 0, tf.maximum(num, 1), dtype=tf.int32)
    # Without a candidate: `chosen` itself as a placeholder, masked by the caller.
    return tf.concat([candidates, [chosen]], 0)[pick], num > 0
