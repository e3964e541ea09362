"""The transformers engine (``--engine transformers``): one model replica making the card's very call.

The card's usage is the transformers ASR pipeline; this engine makes the same model call on batches of
segments from many files: the same log-mel features (WhisperFeatureExtractor, 30 s windows), the same
generate() settings, and the segment's ``max_new_tokens``.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np

from krasr_batch.audio import SAMPLE_RATE
from krasr_batch.engines.base import (
    Decoder,
    SegmentOutput,
    default_batch_size,
    default_dtype_name,
    language_code,
    local_model_dir,
    model_error,
    resolve_device,
)
from krasr_batch.engines.timing import Word, num_frames, words_from_weights
from krasr_batch.settings import DecodeOptions

log = logging.getLogger(__name__)


class WhisperDecoder(Decoder):
    """The transformers engine: one model replica, the card's very call. Load once, then ``decode(inputs)``."""

    engine = "transformers"

    def __init__(self, options: DecodeOptions, device: str = "auto"):
        import torch
        from transformers import WhisperForConditionalGeneration

        super().__init__(options, resolve_device(device))
        if options.dtype == "int8" and self.device != "cpu":
            raise RuntimeError("--dtype int8 (dynamic quantization) runs on the CPU only; use float16 on a GPU")
        if options.dtype == "int8":
            self.dtype = torch.float32  # activations stay float32; the linear layers' weights become int8
        else:
            self.dtype = getattr(torch, default_dtype_name(options.dtype, self.device))
        t0 = time.perf_counter()
        folder = local_model_dir(options.model)  # a hub id's snapshot: files read from here, no hub request each
        self._load_processor(folder=folder)
        try:
            self.model = WhisperForConditionalGeneration.from_pretrained(
                str(folder), dtype=self.dtype, attn_implementation="sdpa", use_safetensors=True,
                trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise model_error(options.model, e) from e
        self.model.to(self.device).eval()
        if options.dtype == "int8":
            from torch.ao.quantization import quantize_dynamic

            self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self._encoded = None
        self.model.model.encoder.register_forward_hook(self._keep_encoder_output)
        self._auto_config = None  # detection among --languages: the generation config with only their tokens
        if options.languages:
            self._auto_config = copy.deepcopy(self.model.generation_config)
            keep = {self.token_by_code[c] for c in options.languages}
            self._auto_config.lang_to_id = {k: v for k, v in self._auto_config.lang_to_id.items() if v in keep}
        self.batch_size = default_batch_size(options.batch_size, self.device)
        self.precision = "int8" if options.dtype == "int8" else str(self.dtype).removeprefix("torch.")
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s on %s (%s) in %.1f s", options.model, self.device, self.dtype, self.load_s)

    # Forced languages share a batch: generate(language=[...]) gives each row its own prompt (of one length), so
    # a row decodes as in a batch of its language alone. A GPU batch then fills across languages; a CPU replica
    # decodes one segment at a time anyway.
    mixed_languages = True

    def _generate_batch(self, batch: list) -> list[SegmentOutput]:
        languages = [x.language for x in batch]
        language = languages[0] if len(set(languages)) == 1 else languages
        return self._generate([x.audio for x in batch], language, batch[0].max_new_tokens)

    def _generate(self, audios: list[np.ndarray], language: str | list[str] | None, limit: int) -> list[SegmentOutput]:
        """Decode one batch with one token limit; ``language``: one for every row, a list with one forced
        language per row, or None (detect)."""
        import torch

        t0 = time.perf_counter()
        asked = language if isinstance(language, list) else [language] * len(audios)  # one per row
        feats = self._features(audios, "pt")
        # the card's no_repeat_ngram_size, applied by NoRepeatNGramBan rather than transformers' own processor
        kwargs = dict(task=self.options.task, num_beams=self.options.beams, no_repeat_ngram_size=0,
                      repetition_penalty=self.options.repetition_penalty, max_new_tokens=limit)
        if language is not None:
            kwargs["language"] = language
        elif self._auto_config is not None:  # transformers' detection masks every token not in lang_to_id
            kwargs["generation_config"] = self._auto_config
        with torch.inference_mode():
            from transformers import LogitsProcessorList

            features = feats["input_features"].to(self.device, self.dtype)
            self._encoded = None
            recorder = _StepRecorder(max(2, 2 * self.options.beams))
            processors = [recorder]
            if self.options.no_repeat_ngram_size > 0:
                processors.insert(0, NoRepeatNGramBan(self.options.no_repeat_ngram_size))
            out = self.model.generate(
                features, attention_mask=feats["attention_mask"].to(self.device), return_dict_in_generate=True,
                logits_processor=LogitsProcessorList(processors), **kwargs)
            encoded, self._encoded = self._encoded, None  # kept by the hook for the no-speech step
            seqs = out if isinstance(out, torch.Tensor) else out["sequences"]
            if seqs.shape[0] != len(audios) and len(audios) > 1:  # seen with random weights: decode one by one
                log.warning("generate() returned %d rows for %d inputs; decoding them one at a time",
                            seqs.shape[0], len(audios))
                return [r for a, x in zip(audios, asked) for r in self._generate([a], x, limit)]
            rows = seqs.tolist()
            spans = [self._split(row) for row in rows]
            signals = self._signals(out, encoded, seqs, spans, recorder)
            words = [None] * len(spans)
            if self.options.word_timestamps:
                if encoded is None or encoded.shape[0] != len(spans):  # not kept by the hook: encode again
                    encoded = self.model.model.encoder(features).last_hidden_state
                words = self._align(encoded, seqs, spans, audios)
        decode_s = time.perf_counter() - t0
        texts = self.tokenizer.batch_decode(seqs.cpu(), skip_special_tokens=True)
        results = []
        for text, (start, end, ended, lang), (avg_lp, nsp, first), w, x in zip(texts, spans, signals, words, asked):
            code = lang or language_code(x)
            lang_p = self.language_prob(first, code) if first is not None else None
            results.append(SegmentOutput(text.strip(), code, end - start, not ended, decode_s, len(audios), avg_lp,
                                         nsp, lang_p, w))
        return results

    def _align(self, encoded, seqs, spans, audios: list[np.ndarray]) -> list[tuple[Word, ...] | None]:
        """Each row's words (see engines/timing.py): one teacher-forced decoder pass over the chosen tokens and
        end-of-text, keeping the alignment heads' cross-attention (eager attention for this pass only: SDPA
        gives no weights), then transformers' own median filter and DTW, as openai/whisper's find_alignment."""
        import torch

        n = len(spans)
        # a row that filled the model's positions has no place for end-of-text: it goes without it (that row
        # only enters the normalisation, not the rows DTW aligns)
        width = min(max(end for _, end, _, _ in spans) + 1, self.model.config.max_target_positions)
        ids = torch.full((n, width), self.eos, dtype=torch.long, device=seqs.device)
        for b, (_, end, _, _) in enumerate(spans):
            ids[b, :end] = seqs[b, :end]  # prompt and text, then end-of-text (padding after it is causal-safe)
        heads = self.alignment_heads
        layers = sorted({layer for layer, _ in heads})
        kept: dict[int, object] = {}

        def keep(layer: int):
            picks = [h for ll, h in heads if ll == layer]
            return lambda module, args, output: kept.__setitem__(layer, output[1][:, picks])

        decoder = self.model.model.decoder
        hooks = [decoder.layers[layer].encoder_attn.register_forward_hook(keep(layer)) for layer in layers]
        config = self.model.config
        attn = config._attn_implementation
        try:
            config._attn_implementation = "eager"
            hidden = decoder(input_ids=ids, encoder_hidden_states=encoded, use_cache=False).last_hidden_state
        finally:
            config._attn_implementation = attn
            for h in hooks:
                h.remove()
        by_layer = {layer: iter(range(kept[layer].shape[1])) for layer in layers}
        weights = torch.stack([kept[layer][:, next(by_layer[layer])] for layer, _ in heads], dim=1).float()
        out: list[tuple[Word, ...] | None] = []
        for b, (start, end, _, lang) in enumerate(spans):
            text = seqs[b, start:end].tolist()
            if not text:
                out.append(())
                continue
            frames = num_frames(len(audios[b])) // 2
            logits = self.model.proj_out(hidden[b, start - 1:end - 1]).float()[:, :self.eos]
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            token_p = [float(probs[k, t]) if t < self.eos else 0.0 for k, t in enumerate(text)]
            out.append(tuple(words_from_weights(weights[b, :, :, :frames], start, text, token_p, self._word_decode,
                                                self.eos, lang, len(audios[b]) / SAMPLE_RATE)))
        return out

    def _keep_encoder_output(self, module, args, output) -> None:
        """Forward hook: keep the encoder's output of the generate() call for the no-speech step."""
        self._encoded = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _split(self, row: list[int]) -> tuple[int, int, bool, str]:
        """(first text token, end of text, ended with end-of-text, language code) of one output row."""
        k, lang = 0, ""
        while k < len(row) and row[k] in self.prompt_ids:  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>
            lang = self.lang_by_token.get(row[k], lang)
            k += 1
        end = row.index(self.eos, k) if self.eos in row[k:] else len(row)
        return k, end, end < len(row), lang

    def _signals(self, out, encoded, seqs, spans, recorder: _StepRecorder) -> list[tuple]:
        """Whisper's avg_logprob and no_speech_prob for each output row, and the logits of the step after
        <|startoftranscript|> (the language detection step, as numpy), at almost no cost.

        avg_logprob: the mean log-probability of the text tokens and end-of-text as the decoder scored them
        when it chose them (Whisper's own definition; the scores are after the card's logits processors, so a
        repeated token carries the repetition penalty), looked up in what ``recorder`` kept of every step and
        followed through beam search's ``beam_indices``. no_speech_prob: one decoder step at
        <|startoftranscript|> over generate()'s own encoder output (kept by a forward hook).
        """
        import torch

        n = len(spans)
        avg: list[float | None] = [None] * n
        nsp: list[float | None] = [None] * n
        first: list = [None] * n
        prompt = spans[0][0]
        if recorder.ids and prompt and all(sp[0] == prompt for sp in spans):
            ids = torch.stack(recorder.ids)  # (steps, rows, k)
            vals = torch.stack(recorder.values)
            steps = ids.shape[0]
            beams = getattr(out, "beam_indices", None) if not isinstance(out, torch.Tensor) else None
            for b, (start, end, ended, _) in enumerate(spans):
                m = min(end - start + (1 if ended else 0), steps)  # text tokens, and end-of-text when there
                if m <= 0:
                    continue
                t = torch.arange(m, device=ids.device)
                rows = beams[b, :m].to(ids.device) if beams is not None else torch.full_like(t, b)
                if (rows < 0).any():
                    continue
                tokens = seqs[b, start:start + m].to(ids.device)
                hit = ids[t, rows] == tokens[:, None]  # (m, k): the chosen token among the row's best k
                if hit.any(dim=1).all():
                    avg[b] = float((vals[t, rows] * hit).sum() / m)
        if encoded is not None and encoded.shape[0] == seqs.shape[0]:
            hidden = self.model.model.decoder(input_ids=seqs[:, :1], encoder_hidden_states=encoded,
                                              use_cache=False).last_hidden_state
            logits = self.model.proj_out(hidden[:, 0]).float()
            if self.no_speech_id is not None:
                nsp = [float(x) for x in torch.softmax(logits, dim=-1)[:, self.no_speech_id].cpu()]
            first = list(logits.cpu().numpy())
        return list(zip(avg, nsp, first))


class _StepRecorder:
    """A logits processor (placed after the card's) that keeps, per decoding step and hypothesis, the k best
    tokens and their processed log-probabilities; beam search only ever chooses among a row's 2*beams best."""

    def __init__(self, k: int):
        self.k = k
        self.ids: list = []
        self.values: list = []

    def __call__(self, input_ids, scores):
        v, i = scores.topk(self.k, dim=-1)
        self.ids.append(i)
        self.values.append(v)
        return scores


class NoRepeatNGramBan:
    """The card's ``no_repeat_ngram_size``: the tokens that would repeat an n-gram of the sequence so far get
    -inf, exactly the ban of transformers' ``NoRepeatNGramLogitsProcessor`` (the prompt tokens count too).

    Why our own: releases of transformers before 5.2x build every hypothesis's n-grams in a Python loop at
    each step, which on a GPU batch (hundreds of hypotheses, hundreds of steps) costs more than the model;
    this is one vectorised match of the last n-1 tokens against every window, on the scores' device, in any
    version. The ban is a set of -inf entries, so its place among the other processors does not change the
    result. tests/test_decode.py checks it against transformers' processor.
    """

    def __init__(self, ngram_size: int):
        self.n = ngram_size

    def __call__(self, input_ids, scores):
        import torch

        cur_len = input_ids.shape[-1]
        if cur_len < self.n:
            return scores
        prefix = input_ids[:, cur_len + 1 - self.n:]  # what the next token would complete
        windows = input_ids.unfold(1, self.n, 1)  # (rows, cur_len - n + 1, n): every n-gram so far
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        vocab = scores.shape[-1]
        banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
        # a window that does not match bans the spare column past the vocabulary, which is dropped
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -float("inf"))
