"""privacy.json states the collusion tolerance of the smallest round the roster admits."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.crypto.roster import Roster
from securefed.crypto.secagg.active import collusion_tolerance
from securefed.crypto.secagg.config import default_threshold
from securefed.protocol.harness import ProtocolSite, run_sum
from securefed.protocol.modes.masking import MaskingMode


def test_the_stated_tolerance_is_the_least_over_the_rounds_a_server_may_run():
    # 13 sites, a roster minimum of 7: the full round (t = 9 of 13) survives 4 colluders, but
    # the server may run a 7-site round (t = 5 of 7), which survives 2. Stating 4 overclaimed.
    roster, _ = Roster.generate(13, min_contributors=7)
    config = RunConfig(secure_agg="mask", clients=13)
    described = MaskingMode().server(config, n_sites=13, roster=roster).describe()
    full = collusion_tolerance(threshold=default_threshold(neighbourhood_size=13), holders=13)
    smallest = collusion_tolerance(threshold=default_threshold(neighbourhood_size=7), holders=7)
    assert (full, smallest) == (4, 2)
    assert described["tolerated_colluders"] == smallest
    assert described["tolerated_colluders_full_round"] == full


@pytest.mark.parametrize(
    ("min_contributors", "chosen", "colluders"),
    [
        (2, [0, 2], [2]),  # the in-process roster's minimum: a 2-site round, t = m = 2
        (3, [0, 1, 2], [1, 2]),  # every site pinned: t = m = 3
    ],
)
def test_the_stated_tolerance_is_below_the_colluders_that_read_a_site_in_a_round_of_t_equal_m(
    min_contributors, chosen, colluders
):
    # Review 32b: at t = m the bound 2t - m - 1 stated m - 1 tolerated colluders, but m - 1
    # colluders are all the victim's partners: an honest round's sum minus their inputs is the
    # victim's update. privacy.json stated 1 and 2 here; the true tolerance is m - 2.
    rng = np.random.default_rng(0)
    config = RunConfig(secure_agg="mask", clients=3, secagg_clip=100.0)
    roster, keys = Roster.generate(3, min_contributors=min_contributors)
    stated = MaskingMode().server(config, n_sites=3, roster=roster).describe()
    vectors = {s: rng.uniform(-10, 10, 6) for s in chosen}
    sites = {
        s: ProtocolSite(
            MaskingMode().site(config, site_id=s, identity=keys[s], roster=roster), vectors[s]
        )
        for s in chosen
    }
    collector = MaskingMode().server(config, n_sites=3, roster=roster)
    outcome, _ = run_sum(collector, sites, round_index=1, n_sites=len(chosen), dim=6)
    assert outcome.error is None
    victim = outcome.total - sum(vectors[c] for c in colluders)
    # What any sum gives them, up to the ring's rounding of the sum.
    np.testing.assert_allclose(victim, vectors[0], rtol=0, atol=stated["sum_error_max"])
    assert stated["tolerated_colluders"] < len(colluders)
    assert collusion_tolerance(threshold=3, holders=3) == 1
    assert collusion_tolerance(threshold=2, holders=2) == 0
