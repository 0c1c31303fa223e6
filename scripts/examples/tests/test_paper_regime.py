"""The paper-regime experiment's smoke run (2 rounds, 2 strategies, tiny sizes) through the real
server, and its data loader on a made-up apt dump. Needs torch, PEFT, transformers and the packaged
MiniLM-L6: run with scripts/install-python-examples's python. The smoke run reads apt's package
lists (`apt-cache dumpavail`; it runs `apt-get update` when there are none)."""
import json
import sys
import unittest
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(EXAMPLES.parent / "tests"), str(EXAMPLES)]
from support import ServerTestCase  # noqa: E402

import lora_aggregator_client as lac  # noqa: E402
import paper_regime  # noqa: E402

DUMP = """Package: alpha
Section: net
Description: a network daemon
 It serves things.
 .
 Over the network.

Package: beta
Section: contrib/net
Description: a network client

Package: gamma
Section: games
Description: Transitional package

Package: delta
Section: net
Description: Transitional package

Package: epsilon
Section: games
Description: a game of skill
"""


class DataTests(unittest.TestCase):
    def test_descriptions_are_read_by_section_without_names_and_shared_texts_are_dropped(self):
        sections = paper_regime.parse_descriptions(DUMP)
        self.assertEqual(sections["net"], {"a network daemon It serves things. Over the network.", "a network client", "Transitional package"})
        self.assertEqual(paper_regime.select_classes(sections, 2),
                         {"games": ["a game of skill"], "net": ["a network client", "a network daemon It serves things. Over the network."]})


class SmokeTests(ServerTestCase):
    def test_the_smoke_run_trains_every_strategy_through_the_service(self):
        output = Path(self.directory.name) / "paper"
        results = paper_regime.main(["--server", self.url, "--smoke", "--federation-prefix", "smoke", "--output-dir", str(output)])
        settings = results["config"]
        self.assertEqual((settings["rounds"], settings["strategies"], settings["seeds"]), (2, ["replication", "svd"], [0]))
        self.assertEqual(json.loads((output / "results.json").read_text())["data"]["sha256"], results["data"]["sha256"])
        self.assertEqual(len(results["data"]["sha256"]), 64)
        self.assertEqual((output / "accuracy.png").read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
        self.assertTrue(0.0 <= results["ceiling"]["accuracy"] <= 1.0)
        service = lac.Client(self.url)
        high = results["allocation"]["alpha_fixed"]["0"]["high_rank_clients"]
        self.assertEqual(len(high), 1)
        for strategy in ("replication", "svd"):
            run = results["runs"]["alpha_fixed"][strategy]["0"]
            self.assertEqual([r["round"] for r in run["rounds"]], [1, 2])
            for entry in run["rounds"]:
                self.assertIsInstance(entry["global_accuracy"], float)
                self.assertTrue(0.0 <= entry["global_accuracy"] <= 1.0)
            diagnostic = run["diagnostic"]
            self.assertEqual((diagnostic["round"], diagnostic["client"], diagnostic["rank"]), (2, high[0], 20))
            for key in ("before_aggregation", "after_aggregation"):
                self.assertTrue(0.0 <= diagnostic[key] <= 1.0)
            federation = service.federation(run["federation"])
            self.assertEqual((federation["settings"]["strategy"], federation["settings"]["chain"], federation["current_round"]), (strategy, True, 3))
            for round_ in (1, 2):
                status = service.status(federation=run["federation"], round=round_)
                self.assertEqual((status["sealed_by"], len(status["uploads"])), ("max_uploads", 10))
            ranks = sorted(u["rank"] for u in service.status(federation=run["federation"], round=2)["uploads"])
            self.assertEqual(ranks, [5] * 9 + [20])
        # Round 1 is trained once: every federation holds the same ten adapters.
        first = [[(u["client"], u["sha256"], u["weight"]) for u in service.status(federation=results["runs"]["alpha_fixed"][s]["0"]["federation"], round=1)["uploads"]]
                 for s in ("replication", "svd")]
        self.assertEqual(first[0], first[1])


if __name__ == "__main__":
    unittest.main()
