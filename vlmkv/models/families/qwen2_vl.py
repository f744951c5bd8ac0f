"""Qwen2-VL / Qwen2.5-VL: every image or video sits between <|vision_start|> and <|vision_end|>
(labelled special). A video run is cut into frames of (h * w / merge^2) tokens when `video_grid_thw`
is given. Positions are M-RoPE (3 x [B, S]); labels do not depend on them."""
from ..modality import ModalityAdapter, _cfg_get, register_family


@register_family("qwen2_vl", "qwen2_5_vl")
class Qwen2VLAdapter(ModalityAdapter):
    def __init__(self, config, tokenizer=None):
        super().__init__(config, tokenizer)
        self.image_id = int(_cfg_get(config, "image_token_id"))
        self.video_id = _cfg_get(config, "video_token_id")
        self.visual_ids = {self.image_id} | ({int(self.video_id)} if self.video_id is not None else set())
        self.special_ids = {int(t) for t in (_cfg_get(config, "vision_start_token_id"),
                                             _cfg_get(config, "vision_end_token_id")) if t is not None}
        self.merge = getattr(config.vision_config, "spatial_merge_size", 2)
        self._video_frames: list[int] = []

    def label(self, input_ids, attention_mask=None, **inputs):
        thw = inputs.get("video_grid_thw")
        # tokens per frame of each video, in order of appearance
        self._video_frames = [] if thw is None else [int(h * w) // self.merge ** 2 for _, h, w in thw.tolist()]
        self._video_seen = 0
        return super().label(input_ids, attention_mask, **inputs)

    def frame_length(self, row_ids, start, end):
        if self.video_id is not None and row_ids[start] == self.video_id and self._video_frames:
            n = self._video_frames[min(self._video_seen, len(self._video_frames) - 1)]
            self._video_seen += 1
            return n
        return None
