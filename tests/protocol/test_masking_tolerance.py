"""privacy.json states the collusion tolerance of the smallest round the roster admits."""

from __future__ import annotations

from securefed.config import RunConfig
from securefed.crypto.roster import Roster
from securefed.crypto.secagg.active import collusion_tolerance
from securefed.crypto.secagg.config import default_threshold
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
