"""The published outputs of the real base model, cross-encoder/ms-marco-MiniLM-L6-v2 (raw logits, Identity activation).

Runs only when that model is already on this machine: in the Hugging Face cache (HF_HUB_CACHE / HF_HOME, looked up
without network access) or under weights/ (`weights/cross-encoder/ms-marco-MiniLM-L6-v2`). Otherwise every test here is skipped
with the reason. To run them: `hf download cross-encoder/ms-marco-MiniLM-L6-v2` on a machine with internet access.

Sources of the numbers:
  * Berlin pair: sentence-transformers docs (docs/cross_encoder/usage/usage.rst, examples/cross_encoder/training/
    ms_marco/README.md) and the model card: `array([ 8.607138 , -4.3200774])`; with Sigmoid `[0.9998173, 0.01312432]`
    (sbert.net pretrained_models page).
  * toprol: sentence-transformers tests/cross_encoder/test_pretrained.py (v3.x/v4.x), `pytest.approx(rel=1e-4)`.
  * Mockingbird rank: the `CrossEncoder.rank` docstring (newest sentence-transformers prints all six scores).
  * "Red Planet": sentence-transformers tests/cross_encoder/test_pretrained.py (v5.x), 5 decimals.
"""

from pathlib import Path

import numpy as np
import pytest

import minilm.checkpoint

REPO_IDS = ("cross-encoder/ms-marco-MiniLM-L6-v2", "cross-encoder/ms-marco-MiniLM-L-6-v2")  # renamed in 2025
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def find_local_model():
    """The folder of the base model if it is on this machine, else None. Never touches the network."""
    for weights_dir in minilm.checkpoint.WEIGHTS_DIRS:
        for repo_id in REPO_IDS:
            folder = Path(weights_dir) / repo_id
            if (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHTS):
                return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo_id in REPO_IDS:
        config = try_to_load_from_cache(repo_id, "config.json")  # reads refs/main and the snapshot; no HTTP
        if isinstance(config, str):
            folder = Path(config).parent
            if any((folder / w).is_file() for w in WEIGHTS):
                return folder
    return None


MODEL_DIR = find_local_model()
pytestmark = pytest.mark.skipif(
    MODEL_DIR is None,
    reason="cross-encoder/ms-marco-MiniLM-L6-v2 is not in the local Hugging Face cache nor under weights/ "
    "(offline machine); `hf download cross-encoder/ms-marco-MiniLM-L6-v2` to run these tests",
)

BERLIN_QUERY = "How many people live in Berlin?"
BERLIN_PASSAGES = [
    "Berlin had a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
    "Berlin is well known for its museums.",
]
TOPROL_QUERY = "is toprol xl the same as metoprolol?"
TOPROL_ANSWERS = [
    "Metoprolol succinate is also known by the brand name Toprol XL. It is the extended-release form of metoprolol. Metoprolol succinate is approved to treat high blood pressure, chronic chest pain, and congestive heart failure.",
    "Pill with imprint 1 is White, Round and has been identified as Metoprolol Tartrate 25 mg.",
    "Interactions between your drugs No interactions were found between Allergy Relief and metoprolol. This does not necessarily mean no interactions exist. Always consult your healthcare provider.",
]
MOCKINGBIRD_QUERY = "Who wrote 'To Kill a Mockingbird'?"
MOCKINGBIRD_DOCUMENTS = [
    "'To Kill a Mockingbird' is a novel by Harper Lee published in 1960. It was immediately successful, winning the Pulitzer Prize, and has become a classic of modern American literature.",
    "The novel 'Moby-Dick' was written by Herman Melville and first published in 1851. It is considered a masterpiece of American literature and deals with complex themes of obsession, revenge, and the conflict between good and evil.",
    "Harper Lee, an American novelist widely known for her novel 'To Kill a Mockingbird', was born in 1926 in Monroeville, Alabama. She received the Pulitzer Prize for Fiction in 1961.",
    "Jane Austen was an English novelist known primarily for her six major novels, which interpret, critique and comment upon the British landed gentry at the end of the 18th century.",
    "The 'Harry Potter' series, which consists of seven fantasy novels written by British author J.K. Rowling, is among the most popular and critically acclaimed books of the modern era.",
    "'The Great Gatsby', a novel written by American author F. Scott Fitzgerald, was published in 1925. The story is set in the Jazz Age and follows the life of millionaire Jay Gatsby and his pursuit of Daisy Buchanan.",
]
MOCKINGBIRD_RANK = [(0, 10.678577423095703), (2, 9.761673927307129), (1, -3.3099513053894043), (5, -4.898908615112305),
                    (4, -5.0829620361328125), (3, -6.478001594543457)]
RED_PLANET_QUERY = "Which planet is known as the Red Planet?"
RED_PLANET_DOCUMENTS = [
    "Venus is often called Earth's twin because of its similar size and proximity.",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
    "Jupiter, the largest planet in our solar system, has a prominent red spot.",
    "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
]


@pytest.fixture(scope="module")
def base_model():
    from minilm import CrossEncoder

    return CrossEncoder.from_pretrained(MODEL_DIR, device="cpu")


def test_activation_is_identity(base_model):
    assert base_model.activation == "torch.nn.modules.linear.Identity"  # the legacy config key: raw logits
    assert base_model.max_length == 512


def test_berlin(base_model):
    scores = base_model.predict([(BERLIN_QUERY, p) for p in BERLIN_PASSAGES])
    assert scores.dtype == np.float32
    assert scores.tolist() == pytest.approx([8.607138, -4.3200774], rel=1e-4)
    sigmoid = base_model.predict([(BERLIN_QUERY, p) for p in BERLIN_PASSAGES], activation="sigmoid")
    assert sigmoid.tolist() == pytest.approx([0.9998173, 0.01312432], rel=1e-4)


def test_toprol(base_model):
    scores = base_model.predict([(TOPROL_QUERY, a) for a in TOPROL_ANSWERS])
    assert scores.tolist() == pytest.approx([8.12545108795166, -3.045016050338745, -3.1524128913879395], rel=1e-4)


def test_mockingbird_rank(base_model):
    results = base_model.rank(MOCKINGBIRD_QUERY, MOCKINGBIRD_DOCUMENTS)
    assert [r["corpus_id"] for r in results] == [i for i, _ in MOCKINGBIRD_RANK]
    assert [r["score"] for r in results] == pytest.approx([s for _, s in MOCKINGBIRD_RANK], rel=1e-4)


def test_red_planet(base_model):
    scores = base_model.predict([(RED_PLANET_QUERY, d) for d in RED_PLANET_DOCUMENTS])
    assert scores.tolist() == pytest.approx([-6.52474, 9.69094, 6.92376, 6.66822], abs=1e-4)
