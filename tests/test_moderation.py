"""The embedded moderation policy: prompts in disguise, innocent words, image checks."""

from __future__ import annotations

import io
import struct
import tomllib
import zlib
from pathlib import Path

import pytest
from PIL import Image

from livemorph.cli import build_parser, settings_from_args
from livemorph.config import Settings
from livemorph.policy import (
    ChainModerator,
    ChatEnhancer,
    EngineEnhancer,
    ImagePolicy,
    PolicyModerator,
    PromptPolicy,
    Verdict,
    WebhookModerator,
    policy_from_settings,
    refusal,
)
from livemorph.policy.moderation import normalise
from livemorph.protocol import MAX_IMAGE_BYTES, is_permanent_error

CATALOG = Path(__file__).parents[1] / "src/livemorph/engines/neural/catalog.toml"


@pytest.fixture(scope="module")
def policy() -> PromptPolicy:
    return PromptPolicy.load()


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("nude", "explicit sexual content"),
        ("NUDE portrait", "explicit sexual content"),
        ("n.u.d.e", "explicit sexual content"),
        ("n u d e", "explicit sexual content"),
        ("a n u d e photo", "explicit sexual content"),
        ("n_u-d*e", "explicit sexual content"),
        ("nu.de beach", "explicit sexual content"),
        ("nuuuuude", "explicit sexual content"),
        ("NÚDÉ", "explicit sexual content"),
        ("ｎｕｄｅ", "explicit sexual content"),  # fullwidth letters
        ("nu\u200bde", "explicit sexual content"),  # a zero-width space inside
        ("nudе", "explicit sexual content"),  # Cyrillic "е"
        ("nudes", "explicit sexual content"),
        ("p0rn", "explicit sexual content"),
        ("pornography", "explicit sexual content"),
        ("s3x", "explicit sexual content"),
        ("$ex scene", "explicit sexual content"),
        ("5 3 x", "explicit sexual content"),
        ("x x x", "explicit sexual content"),
        ("a 1oli drawing", "sexual content involving minors"),
        ("naked children", "sexual content involving minors"),
        ("gory battlefield", "graphic gore"),
        ("d1smembered bodies", "graphic gore"),
        ("d.e.c.a.p.i.t.a.t.e.d", "graphic gore"),
        ("b3h3@ding", "graphic gore"),
        ("heil hitler", "hate speech"),
    ],
)
def test_disguised_prompts_are_refused(policy: PromptPolicy, prompt: str, category: str) -> None:
    verdict = policy.check(prompt)
    assert not verdict.allowed
    assert category in verdict.reason
    assert "not allowed" in verdict.reason  # a permanent refusal: clients do not retry it


def test_slurs_are_refused_in_disguise(policy: PromptPolicy) -> None:
    slurs = policy.entries["hate speech"]
    assert len(slurs) >= 8
    for slur in slurs:
        spaced = " ".join(slur.upper())
        leet = slur.replace("i", "1").replace("e", "3").replace("a", "@")
        doubled = slur[0] + slur[1] * 3 + slur[2:]
        for disguise in (slur, spaced, leet, doubled, f"a {slur}s portrait"):
            assert not policy.check(disguise).allowed, disguise


@pytest.mark.parametrize(
    "prompt",
    [
        "Essex countryside at dawn",
        "Sussex and Middlesex",
        "classic film noir",
        "a therapist's office",
        "Scunthorpe high street",
        "sextant on a ship deck",
        "assassin's creed",
        "spices at a market",
        "nudibranch in a reef",
        "grape harvest",
        "a torpedo boat",
        "lollipop colours",
        "XXL and XXXL shirts",
        "stars seen with the naked eye",
        "soft nude tones",
        "Al Gore giving a talk",
        "Gore-Tex jacket",
        "a snow-covered Pennsylvania town",
        "top 10 styles of 1995",
        "email me@example.com",
        "anime",
        "cyberpunk neon city",
    ],
)
def test_innocent_prompts_pass(policy: PromptPolicy, prompt: str) -> None:
    assert policy.check(prompt) == Verdict(True)


def test_every_catalog_text_passes(policy: PromptPolicy) -> None:
    """The engine's own style names, aliases and descriptions must never be refused."""
    catalog = tomllib.loads(CATALOG.read_text())
    texts = [
        text
        for section in ("style", "recipe", "modifier")
        for entry in catalog[section]
        for value in entry.values()
        for text in (value if isinstance(value, list) else [value])
        if isinstance(text, str)
    ]
    assert len(texts) > 100
    refused = [text for text in texts if not policy.check(text).allowed]
    assert refused == []


def test_normalise_folds_case_accents_and_lookalikes() -> None:
    assert normalise("ÉCOLE Ｆｕｌｌ\u200bwidth Москва") == "ecole fullwidth mockba"


def test_adversarial_prompt_is_checked_quickly(policy: PromptPolicy) -> None:
    """Long runs of one letter must not make the matcher backtrack (a ReDoS guard):
    this would take minutes with greedy, non-possessive patterns."""
    for prompt in ("x" * 2000, "x " * 1000, "s" * 1999 + "!", ("n" * 99 + " ") * 20):
        assert policy.check(prompt).allowed in (True, False)


def test_extra_blocklist_extends_the_embedded_one(tmp_path: Path) -> None:
    extra = tmp_path / "mine.txt"
    extra.write_text(
        "# house rules\n[competitors]\nacme corp*\nrot13:tybooyrgebg\n!acme corpus linguistics\n"
    )
    policy = PromptPolicy.load(extra)
    assert policy.check("an ACME C0RP billboard").reason.endswith("(competitors)")
    assert not policy.check("g.l.o.b.b.l.e.t.r.o.t").allowed
    assert policy.check("the acme corpus linguistics dataset").allowed
    assert not policy.check("nude").allowed, "the embedded list still applies"
    assert PromptPolicy.load().check("acme corp").allowed


def test_bad_blocklist_line_is_named(tmp_path: Path) -> None:
    extra = tmp_path / "bad.txt"
    extra.write_text("fine\n!!!\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        PromptPolicy.load(extra)
    with pytest.raises(FileNotFoundError):
        PromptPolicy.load(tmp_path / "missing.txt")


# --- images --------------------------------------------------------------------------------


def encoded(kind: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (40, 90, 200)).save(buffer, format=kind)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size: a header and no pixels (a decompression bomb's)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
async def test_accepted_image_formats(kind: str) -> None:
    assert await PolicyModerator().check_image(encoded(kind)) == Verdict(True)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (encoded("GIF", mode="P"), "GIF is not accepted"),
        (encoded("BMP"), "BMP is not accepted"),
        (encoded("TIFF"), "TIFF is not accepted"),
        (b"hello, not an image", "not a PNG, JPEG or WebP"),
        (b"", "not a PNG, JPEG or WebP"),
        (encoded("PNG", (300, 300))[:400], "damaged or truncated"),
        (b"\x00" * (MAX_IMAGE_BYTES + 1), "too large: the limit is 10 MB"),
        (png_header(8000, 6000), "too many pixels (8000x6000)"),
        (png_header(100_000, 100_000), "too many pixels"),
    ],
    ids=["gif", "bmp", "tiff", "text", "empty", "truncated-png", "over-10mb", "48mp", "bomb"],
)
async def test_refused_images(data: bytes, words: str) -> None:
    verdict = await PolicyModerator().check_image(data)
    assert not verdict.allowed
    assert words in verdict.reason


def test_png_claiming_jpeg_is_judged_by_content() -> None:
    """The format comes from the bytes: a GIF named .png or sent as a PNG is still a GIF."""
    assert "GIF" in ImagePolicy().check(encoded("GIF", mode="P")).reason
    assert ImagePolicy().check(encoded("PNG")).allowed


def test_pixel_limit_is_read_from_the_header() -> None:
    bomb = png_header(6000, 4000)  # 24 MP claimed, a hundred bytes sent
    assert "too many pixels" in ImagePolicy(max_pixels=6000 * 4000 - 1).check(bomb).reason
    # at the limit the size passes; this file then fails only for having no pixel data
    assert "damaged" in ImagePolicy(max_pixels=6000 * 4000).check(bomb).reason


# --- moderators together -------------------------------------------------------------------


class Recording(PolicyModerator):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__()
        self.verdict = verdict
        self.asked: list[str] = []

    async def check_prompt(self, text: str) -> Verdict:
        self.asked.append(text)
        return self.verdict


async def test_chain_stops_at_the_first_refusal() -> None:
    no = Recording(Verdict(False, "not allowed (house rules)"))
    later = Recording(Verdict(True))
    chain = ChainModerator([no, later])
    assert (await chain.check_prompt("hello")).reason == "not allowed (house rules)"
    assert later.asked == []
    yes = Recording(Verdict(True))
    assert (await ChainModerator([yes, later]).check_prompt("hello")).allowed
    assert later.asked == ["hello"]


async def test_refusal_texts() -> None:
    moderator = PolicyModerator()
    assert await refusal(moderator, "anime", encoded("PNG")) is None
    text = await refusal(moderator, "p0rn", None)
    assert text is not None and text.startswith("prompt refused by moderation: not allowed")
    assert is_permanent_error(text)
    text = await refusal(moderator, "anime", encoded("GIF", mode="P"))
    assert text is not None and text.startswith("image refused by moderation: invalid image")


# --- settings ------------------------------------------------------------------------------


async def test_settings_from_environment_and_flags(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIVEMORPH_MODERATION_URL", "http://127.0.0.1:9/env")
    monkeypatch.setenv("LIVEMORPH_MODERATION_TIMEOUT", "1.5")
    monkeypatch.setenv("LIVEMORPH_ENHANCER_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LIVEMORPH_ENHANCER_API_KEY", "sk-secret-value")
    monkeypatch.setenv("LIVEMORPH_ENHANCER_TIMEOUT", "0.5")
    settings = Settings.from_env()
    assert settings.moderation_url == "http://127.0.0.1:9/env"
    assert settings.moderation_timeout == 1.5
    assert settings.enhancer_timeout == 0.5
    assert "sk-secret-value" not in repr(settings)

    blocklist = tmp_path / "extra.txt"
    blocklist.write_text("[house]\nfrobnicate\n")
    args = build_parser().parse_args(
        [
            "serve",
            "--moderation-url",
            "http://127.0.0.1:9/flag",
            "--moderation-blocklist",
            str(blocklist),
            "--enhancer-model",
            "local-model",
        ]
    )
    settings = settings_from_args(args)
    assert settings.moderation_url == "http://127.0.0.1:9/flag"  # the flag wins
    assert settings.enhancer_model == "local-model"
    assert settings.enhancer_url == "http://127.0.0.1:9/v1"  # from the environment

    moderator, enhancer = policy_from_settings(settings)
    try:
        assert isinstance(moderator, ChainModerator)
        policy, webhook = moderator.moderators
        assert isinstance(policy, PolicyModerator) and isinstance(webhook, WebhookModerator)
        assert webhook.timeout == 1.5
        assert not (await moderator.check_prompt("frobnicate it")).allowed
        assert isinstance(enhancer, ChatEnhancer)
        assert enhancer.url == "http://127.0.0.1:9/v1/chat/completions"
        assert enhancer.model == "local-model"
    finally:
        await moderator.aclose()
        await enhancer.aclose()


def test_defaults_need_no_network() -> None:
    moderator, enhancer = policy_from_settings(Settings())
    assert isinstance(moderator, PolicyModerator)
    assert isinstance(enhancer, EngineEnhancer)
