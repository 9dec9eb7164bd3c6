"""aggregation="daam" against DAAM 0.2.0 itself (runs where daam is installed:
pip install --no-deps daam==0.2.0 spacy matplotlib scipy)."""
import pytest
import torch

import fastfair
from fastfair.maps import Aggregation

daam = pytest.importorskip("daam")

PROMPT = "a photo of the face of a doctor"


@pytest.mark.parametrize("word", ["doctor", "face"])
def test_daam_preset_reproduces_daam_word_heat_maps(tiny_sd, word):
    # tiny-sd: sample_size 16 x vae scale 8 = 128 (not 512/1024), so DAAM uses a 96x96 canvas and needs factors=
    factors = {6, 12}
    with torch.no_grad(), daam.trace(tiny_sd) as tc:
        tiny_sd(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5))
        expect = tc.compute_global_heat_map(factors=factors).compute_word_heat_map(word).heatmap
    fastfair.unpatch(tiny_sd)  # DAAM restored the processors itself; make sure we start clean
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[5], steps=3, maps=[word],
                            aggregation=Aggregation.get("daam").with_factors(factors), progress=False)
    got = gen.maps[word][0]
    assert got.shape == expect.shape == (96, 96)
    torch.testing.assert_close(got, expect.float(), rtol=1e-4, atol=1e-6)
