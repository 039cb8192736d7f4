"""Fault injection shared by the tests of atomic writes."""

from __future__ import annotations

from rslora_jax import _files


def die_between_renames(monkeypatch) -> type[BaseException]:
    """Makes the next directory swap take the two-rename fallback and stop after its first
    rename, as a killed process would; returns the exception class it raises."""

    class Killed(BaseException):
        pass

    def killed(new, target):
        raise Killed

    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    monkeypatch.setattr(_files, "_move_in", killed)
    monkeypatch.setattr(_files, "_move_back", lambda target: None)  # a dead process undoes nothing
    return Killed
