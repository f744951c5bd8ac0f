"""Token modality labels, shared by the modality adapters (which write them) and the policies (which read them):
int8 values in `PrefillContext.token_types` and `Spans.token_types`."""
PAD, TEXT, IMAGE, SPECIAL = -1, 0, 1, 2  # padding, text, image or video, vision marker (e.g. <vision_start>)
