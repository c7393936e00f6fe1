"""The swarm simulation (issue 12): `python bench/sim.py [SCENARIO] ...` is
`python -m petald.sim` (`just sim`); `--help` lists the scenarios. The last line printed is one
JSON object with the measurements."""

from petald.sim.__main__ import main

if __name__ == "__main__":
    main()
