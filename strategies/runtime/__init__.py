"""The bundled torch runtime: precompiled strategies, reference GPT with TP/CP, exact gradient sync."""

__all__: list[str] = []
