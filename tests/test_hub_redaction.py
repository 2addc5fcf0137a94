"""hfplug.hub.redaction: the log filter masks tokens in hfplug's, transformers' and huggingface_hub's output."""

import io
import logging

from hub_fixtures import FG_REPO, READ, WRITE, assert_no_token, no_ambient_token  # noqa: F401

from hfplug.hub import redaction
from hfplug.hub.redaction import install_token_redaction


def test_redaction_filter_masks_tokens_in_hfplug_and_transformers_logs():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root, tf_logger = logging.getLogger(), logging.getLogger("transformers")
    tf_handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    tf_logger.addHandler(tf_handler)
    try:
        secret = "not-token-shaped-secret-42"
        install_token_redaction(secret)
        flt = install_token_redaction()  # idempotent
        assert handler.filters.count(flt) == 1 and tf_logger.filters.count(flt) == 1
        child = logging.getLogger("hfplug.created.after.install")  # covered through the root handler
        child.setLevel(logging.INFO)
        child.warning("token %s and url https://x/?t=%s", WRITE, secret)
        child.warning("shaped like one: hf_%s", "Z" * 31)
        logging.getLogger("transformers.trainer").warning("Trainer got %s", READ)
        try:
            raise RuntimeError(f"bad token {FG_REPO}")
        except RuntimeError:
            child.exception("failed")
        child.info("plain %s message, %d", "ordinary", 3)
    finally:
        root.removeHandler(handler)
        tf_logger.removeHandler(tf_handler)
    text = stream.getvalue()
    assert_no_token(text)
    assert secret not in text and "Z" * 31 not in text
    assert text.count(redaction.MASK) >= 5
    assert "plain ordinary message, 3" in text and "hf_" not in text.split("plain")[1]
    assert "RuntimeError: bad token hf_***" in text
