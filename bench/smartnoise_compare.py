"""SmartNoise SQL side of `enclave bench dp`: the same query, rows, bounds and total epsilon as the enclave.

Run by the enclave's benchmark with the venv it creates; not a test. Reads a CSV (person_id, department, los),
runs the grouped COUNT(*) + AVG(los) query `--runs` times and prints one JSON object: the per-query times and
every answer, plus the epsilon SmartNoise reports for one query.
"""

import argparse
import json
import sys
import time

import pandas as pd
import snsql
from snsql import Privacy

METADATA = """
Database:
  bench:
    encounters:
      max_ids: {max_ids}
      row_privacy: False
      sample_max_ids: True
      censor_dims: False
      person_id:
        type: string
        private_id: True
      department:
        type: string
      los:
        type: float
        lower: 0.0
        upper: {upper}
"""

QUERY = "SELECT department, COUNT(*) AS n, AVG(los) AS los FROM bench.encounters GROUP BY department"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--csv", required=True)
    p.add_argument("--metadata", required=True)
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-6)
    p.add_argument("--max-ids", type=int, default=5)
    p.add_argument("--upper", type=float, default=30.0)
    p.add_argument("--runs", type=int, default=20)
    a = p.parse_args()

    with open(a.metadata, "w") as f:
        f.write(METADATA.format(max_ids=a.max_ids, upper=a.upper))
    df = pd.read_csv(a.csv, dtype={"person_id": str, "department": str, "los": float})

    # SmartNoise charges each aggregate column its own epsilon: scale so the whole query costs `epsilon`.
    probe = snsql.from_df(df, privacy=Privacy(epsilon=1.0, delta=a.delta), metadata=a.metadata)
    cost_at_1, _ = probe.get_privacy_cost(QUERY)
    per_column = a.epsilon / cost_at_1
    reader = snsql.from_df(df, privacy=Privacy(epsilon=per_column, delta=a.delta), metadata=a.metadata)
    total, delta = reader.get_privacy_cost(QUERY)

    times, answers = [], []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        out = reader.execute_df(QUERY)
        times.append(time.perf_counter() - t0)
        answers.append(
            {str(r["department"]): {"n": float(r["n"]), "los": float(r["los"])} for _, r in out.iterrows()}
        )
    json.dump({"times": times, "answers": answers, "epsilon": total, "delta": delta}, sys.stdout)


if __name__ == "__main__":
    main()
