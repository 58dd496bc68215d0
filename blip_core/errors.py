"""User-facing errors: raised for bad input, printed by the CLI as one line (never a traceback)."""


class UserError(Exception):
    """A mistake in the user's input (paths, URIs, config values, data): reported as one clear line."""


def load_failure(e: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` refused a file (its own message spans lines)."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        return "not a weights-only PyTorch file: not a checkpoint at all, or one that needs code to load (refused)"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0]}"
