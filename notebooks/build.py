"""Write notebooks/*.ipynb from the cells below, so the notebooks are reviewed as code.

    .venv/bin/python notebooks/build.py          # rewrite quickstart.ipynb, privacy_utility.ipynb
    .venv/bin/python notebooks/build.py --check  # exit 1 if a committed notebook is stale

Notebooks are written without outputs and with fixed cell ids, so the same cells always give
the same bytes. ``tests/integration/test_notebooks.py`` checks they are fresh and runs them.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

Cell = tuple[str, str]  # ("md" | "code", source)


def md(source: str) -> Cell:
    """A markdown cell."""
    return ("md", textwrap.dedent(source).strip())


def code(source: str) -> Cell:
    """A code cell."""
    return ("code", textwrap.dedent(source).strip())


QUICKSTART: list[Cell] = [
    md(
        """
        # Federation quickstart

        Two jurisdictions, **Hong Kong** and **Shenzhen**, each run a node next to their own
        records. This notebook starts both as real processes on this machine (gRPC with mutual
        TLS and throwaway certificates: the production code path), then asks them for
        differentially private (DP) statistics, trains a DP model across them, and reads the
        privacy budget and the audit trail.

        The data is synthetic and generated here, so the notebook can show the **true value
        beside each DP estimate**. A real coordinator never has the true values: it sees only
        what the nodes release.
        """
    ),
    code(
        """
        import subprocess
        import sys

        import numpy as np
        from IPython.display import HTML, Markdown, display

        from federation import (
            BudgetExhaustedError,
            Count,
            Histogram,
            LocalFederation,
            Mean,
            Quantile,
            Sum,
            parse_filter,
        )
        from federation.datasets import CREDIT_SCHEMA, synthetic_credit
        from federation.models import ModelSpec

        NODES = ["hong-kong", "shenzhen"]
        ROWS = 20_000  # per node: small, so the notebook runs in about a minute
        """
    ),
    md(
        """
        ## Start a local federation

        Each node gets its own synthetic credit applicants (the two populations differ on
        purpose: Shenzhen's applicants are younger, earn less and default more). We keep the
        arrays in `frames` only to compute true values below.

        `LocalFederation` writes each node's data and config to a temp dir, starts the nodes,
        waits until they are healthy and returns a connected `Coordinator`. `local.stop()`
        (last cell) stops them and deletes the temp dir; so does restarting or shutting down
        the kernel, and the node processes die even with a kernel that crashed. In a single
        cell the same is `with LocalFederation.synthetic(nodes=NODES, rows=ROWS) as fed: ...`,
        which also cleans up when the cell is interrupted; and
        `LocalFederation.from_frames({"hong-kong": df_hk, ...}, schema=...)` serves your own
        pandas frames.
        """
    ),
    code(
        """
        frames = {
            name: synthetic_credit(jurisdiction=name, rows=ROWS, seed=i)
            for i, name in enumerate(NODES)
        }
        pooled = {
            column: np.concatenate([frames[name][column] for name in NODES])
            for column in frames[NODES[0]]
        }

        local = LocalFederation.from_arrays(
            frames, schema=CREDIT_SCHEMA, epsilon=20.0, max_epsilon_per_release=5.0
        )
        fed = local.start()
        """
    ),
    md(
        """
        ## What the nodes publish about themselves

        `describe()` returns each node's public metadata: the dataset schema its operator
        declared (types, public bounds, category domains; never values from the data) and
        our privacy budget there.
        """
    ),
    code(
        """
        for description in fed.describe().values():
            display(description)
        """
    ),
    md(
        """
        ## DP queries, with the true values beside them

        Each query spends its `epsilon` at **each** node: the nodes hold different people, so
        the combined answer is `epsilon`-DP for everyone (parallel composition). The interval
        is a 95% interval for the DP noise: it contains the exact statistic of the nodes' data
        with 95% probability. The table under each result shows what each node charged and
        the receipt id of the release.
        """
    ),
    code(
        """
        count = fed.analyze(Count("credit"), epsilon=0.5)
        HTML(count.to_html(truth={"": [len(pooled["age"])]}))
        """
    ),
    code(
        """
        housing = CREDIT_SCHEMA.column("housing").domain
        by_housing = fed.analyze(Count("credit", group_by="housing"), epsilon=0.5)
        HTML(by_housing.to_html(truth={h: [np.sum(pooled["housing"] == h)] for h in housing}))
        """
    ),
    md(
        """
        A sum with the Gaussian mechanism, which costs a little `delta` as well as `epsilon`.
        Values are clamped to the column's public bounds (here 0 to 2,000,000 HKD) before
        adding up, which is what bounds one person's influence.
        """
    ),
    code(
        """
        loans = fed.analyze(
            Sum("credit", "loan_amount"), epsilon=0.5, mechanism="gaussian", delta=1e-8
        )
        HTML(loans.to_html(truth={"": [pooled["loan_amount"].sum()]}))
        """
    ),
    md("A mean over a filtered cohort (filters are parsed, never `eval`-ed):"),
    code(
        """
        where = parse_filter("age >= 40 and housing == 'rent'")
        debt = fed.analyze(Mean("credit", "debt_ratio", where=where), epsilon=0.5)
        cohort = (pooled["age"] >= 40) & (pooled["housing"] == "rent")
        HTML(debt.to_html(truth={"": [pooled["debt_ratio"][cohort].mean()]}))
        """
    ),
    md("Histograms: over a category domain (grouped), and over equal-width numeric bins."),
    code(
        """
        employment = CREDIT_SCHEMA.column("employment").domain
        defaults = fed.analyze(Histogram("credit", "defaulted", group_by="employment"), epsilon=0.5)
        defaulted = pooled["defaulted"]
        truth = {
            e: [
                np.sum((pooled["employment"] == e) & ~defaulted),
                np.sum((pooled["employment"] == e) & defaulted),
            ]
            for e in employment
        }
        HTML(defaults.to_html(truth=truth))
        """
    ),
    code(
        """
        ages = fed.analyze(Histogram("credit", "age", bins=8), epsilon=0.5)
        true_ages, _ = np.histogram(pooled["age"], bins=np.linspace(18, 90, 9))
        HTML(ages.to_html(truth={"": list(true_ages)}))
        """
    ),
    code(
        """
        qs = (0.25, 0.5, 0.9)
        income = fed.analyze(Quantile("credit", "income", quantiles=qs), epsilon=0.5)
        HTML(income.to_html(truth={"": list(np.quantile(pooled["income"], qs))}))
        """
    ),
    md(
        """
        A request over a node's per-release cap is refused before anything is computed, and
        costs nothing. Errors arrive as exceptions (`BudgetExhaustedError`,
        `PolicyError`, ...), not as gRPC status codes.
        """
    ),
    code(
        """
        try:
            fed.analyze(Count("credit"), epsilon=50.0)
        except BudgetExhaustedError as err:
            print(f"refused: {err}")
        """
    ),
    md(
        """
        ## Train a DP model across both nodes

        The model is named, not shipped: a `ModelSpec` says which architecture (from the
        nodes' allow-list), which features and which label. Each round, every node runs
        DP-SGD on its own records (clipped per-example gradients plus Gaussian noise) and
        sends back only its DP update; the coordinator averages them (FedAvg). The job's
        updates and counts spend `target_epsilon` at each node (a round that is retried is
        charged again). With `metrics_epsilon`, each node also releases DP validation loss
        and accuracy per round, at that extra cost. With `evaluate`, the coordinator also
        scores the global model after every round on labelled records of its own (here a
        synthetic stand-in), at no privacy cost: no node's data is involved.
        """
    ),
    code(
        """
        from federation.metrics import evaluator
        from federation.models import encode_features

        FEATURES = tuple(c.name for c in CREDIT_SCHEMA.columns if c.name != "defaulted")
        spec = ModelSpec(
            architecture="mlp",
            dataset="credit",
            features=FEATURES,
            target="defaulted",
            hidden=(32,),
        )
        mine = synthetic_credit(jurisdiction="hong-kong", rows=5000, seed=123)  # our own records
        x_mine = encode_features(mine, features=FEATURES, schema=fed.schema("credit"))
        training = fed.train(
            spec,
            rounds=5,
            target_epsilon=3.0,
            local_steps=20,
            learning_rate=2.0,
            sample_rate=0.02,
            metrics_epsilon=0.1,
            evaluate=evaluator(x_mine, mine["defaulted"]),
        )
        training
        """
    ),
    code("[round(dict(r.evaluation).get('auc', float('nan')), 3) for r in training.history]"),
    md(
        """
        `training.model` is an ordinary `torch.nn.Module`; `training.save(path)` writes it
        (safetensors). The notebook `privacy_utility.ipynb` measures its ROC-AUC against a
        model trained without privacy.
        """
    ),
    code("training.model"),
    md(
        """
        ## The privacy budget

        Every release above, queries and training rounds alike, was charged at each node
        before it was made, and the node refuses anything past the total. `budgets()` is a
        dict of node name to `BudgetStatus`. The spend is composed with Rényi DP, so it can
        be less than the sum of the charges.
        """
    ),
    code("fed.budgets()"),
]

QUICKSTART_END: list[Cell] = [
    md(
        """
        ## The audit trail

        Each node records every charge and release in a hash-chained, signed audit log in its
        state dir. The node operator (or an auditor) reads it with `federation audit`; here we
        run that command for the Hong Kong node. The report lists our releases, what each
        cost, and the receipts the coordinator got back.
        """
    ),
    code(
        """
        state_dir = local.state_dir("hong-kong")
        command = ["federation", "audit", "report", "--state-dir", str(state_dir)]
        report = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
        if report.returncode != 0:
            raise RuntimeError(report.stderr)
        Markdown(report.stdout)
        """
    ),
    md("## Stop\n\nStop the nodes and delete the temp dir (data, certificates, ledgers)."),
    code("local.stop()"),
]

PRIVACY_UTILITY: list[Cell] = [
    md(
        """
        # Privacy versus utility

        How much accuracy does differential privacy cost, as a function of `epsilon`? This
        notebook measures it on the production code path (real nodes on this machine):

        1. the error of a DP **mean** across the two nodes, for `epsilon` from 0.05 to 3;
        2. the ROC-AUC of a **federated DP model**, for `epsilon` 0.3, 1, 3 and 8, against the
           same model trained without privacy on the pooled data (a centralised baseline
           that a real federation could never build).

        The data is synthetic and generated here, which is the only reason we can compute
        true values and a centralised baseline.
        """
    ),
    code(
        """
        %matplotlib inline
        import matplotlib.pyplot as plt
        import numpy as np
        import torch

        from federation import LocalFederation, Mean
        from federation.datasets import CREDIT_SCHEMA, synthetic_credit
        from federation.metrics import predict
        from federation.metrics import roc_auc as auc
        from federation.models import ModelSpec, build_model, encode_features, input_dim

        NODES = ["hong-kong", "shenzhen"]
        ROWS = 20_000  # per node
        frames = {
            name: synthetic_credit(jurisdiction=name, rows=ROWS, seed=i)
            for i, name in enumerate(NODES)
        }
        pooled = {
            column: np.concatenate([frames[name][column] for name in NODES])
            for column in frames[NODES[0]]
        }
        local = LocalFederation.from_arrays(
            frames, schema=CREDIT_SCHEMA, epsilon=200.0, max_epsilon_per_release=10.0
        )
        fed = local.start()
        """
    ),
    md(
        """
        ## Error of a DP mean

        Mean annual income over both jurisdictions, asked `REPEATS` times at each `epsilon`
        (fresh noise each time). The error is relative to the true mean.
        """
    ),
    code(
        """
        EPSILONS = [0.05, 0.1, 0.3, 1.0, 3.0]
        REPEATS = 15
        true_mean = pooled["income"].mean()
        errors = np.array(
            [
                [
                    abs(fed.analyze(Mean("credit", "income"), epsilon=eps).value - true_mean)
                    / true_mean
                    for _ in range(REPEATS)
                ]
                for eps in EPSILONS
            ]
        )
        # The sampling error already in the data: the standard error of the mean, relative.
        sampling_error = pooled["income"].std() / np.sqrt(len(pooled["income"])) / true_mean
        """
    ),
    code(
        """
        fig, ax = plt.subplots(figsize=(6, 4))
        low, median, high = np.percentile(errors, [25, 50, 75], axis=1)
        ax.plot(EPSILONS, median, "o-", label="DP mean: median error")
        ax.fill_between(EPSILONS, low, high, alpha=0.2, label="25% to 75% of repeats")
        ax.axhline(sampling_error, color="grey", linestyle="--", label="sampling error of the data")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="epsilon per node",
            ylabel="|DP mean - true mean| / true mean",
            title=f"Mean income, {len(NODES)} nodes x {ROWS:,} rows",
        )
        ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS], minor=False)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.legend(loc="lower left")
        plt.show()
        """
    ),
    md(
        """
        **How to read it.** Both axes are logarithmic; each point is the median of
        `REPEATS` fresh releases and the band holds the middle half of them. The noise of a
        release scales as `1 / epsilon`, so the error falls along a line of slope -1: ten
        times the budget buys about ten times less error (single releases scatter around
        it, hence the band). The dashed line is the sampling error: how far this data's mean
        is from its population's anyway. Below it, privacy costs less accuracy than having
        collected a sample in the first place. More rows push the DP error down faster than
        the sampling error (as `1 / rows` against `1 / sqrt(rows)`).
        """
    ),
]

PRIVACY_UTILITY_END: list[Cell] = [
    md(
        """
        ## ROC-AUC of a federated DP model

        The model: a small MLP predicting `defaulted` from every other column. We evaluate it
        on fresh synthetic applicants from both jurisdictions that no node holds. Inputs are
        encoded as each node encodes them: numbers scaled to [0, 1] by their public bounds,
        bools as 0/1, categories one-hot over their public domain.
        """
    ),
    code(
        """
        FEATURES = tuple(c.name for c in CREDIT_SCHEMA.columns if c.name != "defaulted")
        spec = ModelSpec("mlp", "credit", features=FEATURES, target="defaulted", hidden=(32,))
        held_out = {
            column: np.concatenate(
                [synthetic_credit(jurisdiction=n, rows=10_000, seed=100 + i)[column]
                 for i, n in enumerate(NODES)]
            )
            for column in pooled
        }


        def encode(columns):
            \"\"\"The model's inputs, exactly as a node builds them from its records.\"\"\"
            return encode_features(columns, features=FEATURES, schema=CREDIT_SCHEMA)


        def roc_auc(model):
            \"\"\"P(a random defaulter scores above a random non-defaulter) on held-out data.\"\"\"
            return auc(predict(model, encode(held_out)), held_out["defaulted"])
        """
    ),
    md(
        """
        The centralised baseline: the same architecture trained without privacy on the
        pooled data of both jurisdictions (Adam, 20 epochs). A real federation cannot build
        it (the rows never leave their jurisdiction); it marks the best we could hope for.
        """
    ),
    code(
        """
        torch.manual_seed(0)
        torch.set_num_threads(1)  # a tiny model: threads cost more than they save
        baseline = build_model(spec, input_dim=input_dim(spec, CREDIT_SCHEMA))
        X = torch.from_numpy(encode(pooled))
        y = torch.tensor(pooled["defaulted"], dtype=torch.float32)
        optimizer = torch.optim.Adam(baseline.parameters(), lr=0.01)
        loss = torch.nn.BCEWithLogitsLoss()
        for epoch in range(20):
            for batch in torch.randperm(len(y)).split(1024):
                optimizer.zero_grad()
                loss(baseline(X[batch]).squeeze(1), y[batch]).backward()
                optimizer.step()
        baseline_auc = roc_auc(baseline)
        print(f"centralised, non-private ROC-AUC: {baseline_auc:.3f}")
        """
    ),
    md(
        """
        Now the federated DP model, one training job per `epsilon` (the job's total at each
        node), all with the same rounds and hyper-parameters.
        """
    ),
    code(
        """
        TRAIN_EPSILONS = [0.3, 1.0, 3.0, 8.0]
        dp_auc = []
        for eps in TRAIN_EPSILONS:
            result = fed.train(
                spec,
                rounds=5,
                target_epsilon=eps,
                local_steps=20,
                learning_rate=2.0,
                sample_rate=0.02,
            )
            dp_auc.append(roc_auc(result.model))
            print(f"epsilon {eps:g}: ROC-AUC {dp_auc[-1]:.3f}")
        """
    ),
    code(
        """
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(TRAIN_EPSILONS, dp_auc, "o-", label="federated DP model (2 nodes)")
        ax.axhline(baseline_auc, color="grey", linestyle="--", label="centralised, non-private")
        ax.axhline(0.5, color="lightgrey", linestyle=":", label="random guessing")
        ax.set(
            xscale="log",
            ylim=(0.45, 0.9),
            xlabel="epsilon of the training job, per node",
            ylabel="ROC-AUC on held-out applicants",
            title="Default prediction: utility of the DP model",
        )
        ax.set_xticks(TRAIN_EPSILONS, [f"{e:g}" for e in TRAIN_EPSILONS], minor=False)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.legend(loc="lower right")
        plt.show()
        """
    ),
    md(
        """
        **How to read it.** The x-axis is the privacy budget of the whole training job at each
        node (log scale; smaller is more private). The dashed line is the model nobody can
        build across a border; the dotted one is a coin toss. The gap between the points and
        the dashed line is what privacy and federation cost together. Here the points sit
        close to the baseline across the whole range: with 20,000 records per node, the noise
        DP-SGD adds to each averaged gradient is small against the signal, and most of the
        gap comes from training for only 5 rounds. With fewer records per node (try `ROWS`)
        or more rounds at the same `epsilon` (more noise per step), the gap widens, most at
        small `epsilon`. At `epsilon` 0.1 (with `delta` 1e-7 and 100 DP-SGD steps) no noise
        multiplier meets the target, and the nodes refuse the job before spending anything.
        """
    ),
    code("local.stop()"),
]


def notebook(cells: list[Cell], name: str) -> nbformat.NotebookNode:
    """A notebook with these cells, no outputs, fixed ids and the python3 kernel."""
    nb = new_notebook(
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )
    for i, (kind, source) in enumerate(cells):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(source)
        cell["id"] = f"{name}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def notebooks() -> dict[str, nbformat.NotebookNode]:
    """File name -> notebook."""
    return {
        "quickstart.ipynb": notebook(QUICKSTART + QUICKSTART_END, "quickstart"),
        "privacy_utility.ipynb": notebook(PRIVACY_UTILITY + PRIVACY_UTILITY_END, "privacy-utility"),
    }


def render(nb: nbformat.NotebookNode) -> str:
    """The bytes of a notebook file as nbformat writes them."""
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the notebooks, or with --check report the stale ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = []
    for file_name, nb in notebooks().items():
        path = HERE / file_name
        text = render(nb)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(file_name)
        else:
            path.write_text(text)
    if stale:
        sys.stderr.write(f"stale: {', '.join(stale)}; run `python notebooks/build.py`\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
