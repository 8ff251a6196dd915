"""absl flags for the libraries that read theirs (grain's worker processes, tokamax).

They parse sys.argv on first use if nobody parsed the flags yet, which fails on any
command line that is not absl's own (`moe-lab train --config.x=...`, pytest's), or
refuse to run unparsed (grain's multiprocess prefetch).  moe_lab has no absl flags
of its own: parse the program name only, once, before handing over.
"""

from __future__ import annotations

import sys


def parse_absl_flags_once() -> None:
    from absl import flags  # a dependency of grain and tokamax

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])
