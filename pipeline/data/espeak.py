"""Offline speech synthesis with eSpeak NG, through the library bundled in the `espeakng-loader` wheel.

The wheel ships `libespeak-ng.so` and its voice data but no Python API, so this module binds the
classic C API (speak_lib.h) with ctypes. Synthesis is synchronous. It is reproducible only for the
same sequence of utterances in a fresh process: the library keeps hidden state between utterances,
and a few variants (NONDETERMINISTIC_VARIANTS) differ even then.
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import lru_cache

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_EE_OK = 0

# English voices shipped with libespeak-ng 1.52 (checked: each one loads and speaks).
ENGLISH_LANGUAGES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")

# Variants whose output differed between identical runs in fresh processes (6 runs of all 104 variants,
# libespeak-ng 1.52.0): they would break AV-Digits' byte-for-byte reproducibility, so they are not used.
NONDETERMINISTIC_VARIANTS = frozenset({"Alicia", "Demonic", "f2", "f3", "f5", "sandro", "victor", "whisper", "whisperf"})

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded or refused a request."""


class Espeak:
    """A process-wide handle on libespeak-ng; use :func:`get_espeak` rather than constructing it."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - requirements.txt installs it
            raise EspeakError("the package 'espeakng-loader' is required to build AV-Digits "
                              "(pip install -r requirements.txt)") from err
        self.data_path = espeakng_loader.get_data_path()
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed with data path {self.data_path}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # keep a reference: ctypes does not
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()

    def _collect(self, wav, n_samples, _events) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0

    def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int) -> np.ndarray:
        """Speak `text` with `voice` (e.g. "en-us+m3") and return float32 samples in [-1, 1]."""
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise EspeakError(f"eSpeak NG has no voice {voice!r}")
            for param, value in ((_PARAM_RATE, rate_wpm), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
                self._lib.espeak_SetParameter(param, int(value), 0)
            self._chunks = []
            data = text.encode("utf-8") + b"\0"
            if self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None) != _EE_OK:
                raise EspeakError(f"eSpeak NG failed to speak {text!r} with voice {voice!r}")
            self._lib.espeak_Synchronize()
            samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768.0

    def variants(self) -> list[str]:
        """Names of the voice variants (e.g. "f3", "klatt2"), sorted for reproducible sampling."""
        folder = os.path.join(self.data_path, "voices", "!v")
        return sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))


def deterministic_variants() -> list[str]:
    """The voice variants AV-Digits draws from: all shipped ones except NONDETERMINISTIC_VARIANTS."""
    return [v for v in get_espeak().variants() if v not in NONDETERMINISTIC_VARIANTS]


@lru_cache(maxsize=1)
def get_espeak() -> Espeak:
    """The process-wide eSpeak NG instance (the C library keeps global state, so there is only one)."""
    return Espeak()
