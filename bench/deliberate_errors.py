"""Deliberate errors in the methods, each applied, tested and reverted: every one must fail a test.

    python bench/deliberate_errors.py

Each entry changes one line of a method file the way a wrong reading of a paper would (the selection sorted the
wrong way, Eq. 4 without its ReLU, Eq. 7 or Eq. 8 read differently, groups or the MPO layout not as the paper
says, ...), runs the method tests (tests/test_methods.py, test_mpo.py, test_paper_fidelity.py,
test_selection.py; about 10 s each on 2 cores) and restores the file, whatever happens. It prints, per error, the
test summary and the first failing test; an error that no test catches says "passed" with no failure. A
complement to `make mutation`: these are the errors a person makes, mutmut's are the ones a machine makes.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ["tests/test_methods.py", "tests/test_mpo.py", "tests/test_paper_fidelity.py", "tests/test_selection.py"]
ERRORS = [
    ("selection sorted ascending (the least important chosen)", "opdiff/methods/lora_over_select.py",
     "free.sort(key=lambda k: (-float(self.scores[k]), k))", "free.sort(key=lambda k: (float(self.scores[k]), k))"),
    ("ReLU removed from the OP generator (Eq. 4)", "opdiff/methods/op.py",
     "hidden = torch.relu(torch.baddbmm(", "hidden = (torch.baddbmm("),
    ("B head not zero at init (App. C.1)", "opdiff/methods/op.py",
     "        w2[:, n_a:] = 0.0  # the B head starts at zero (Appendix C.1)\n", ""),
    ("kaiming bound wrong (App. C.1)", "opdiff/methods/op.py",
     "bound = 1.0 / math.sqrt(fan_in)", "bound = 1.0 / fan_in"),
    ("Eq. 7 read as the loss without W (no difference)", "opdiff/methods/lora_over_select.py",
     "scores[k] = abs(base - probe_loss(n))", "scores[k] = probe_loss(n)"),
    ("Eq. 7 without the absolute value", "opdiff/methods/lora_over_select.py",
     "scores[k] = abs(base - probe_loss(n))", "scores[k] = base - probe_loss(n)"),
    ("Eq. 8 without the absolute value", "opdiff/methods/lora_over_select.py",
     "self.scores[k] += (w.grad.double() * w.double()).sum().abs()", "self.scores[k] += (w.grad.double() * w.double()).sum()"),
    ("Eq. 8 as |dL/dW| alone", "opdiff/methods/lora_over_select.py",
     "self.scores[k] += (w.grad.double() * w.double()).sum().abs()", "self.scores[k] += w.grad.double().abs().sum()"),
    ("MPOR scores reset every round (not accumulated over the run)", "opdiff/methods/lora_over_select.py",
     'if cfg.select_accumulate == "round":', "if True:"),
    ("groups without self/cross attention", "opdiff/methods/lora_over_select.py",
     'role = next((ATTENTION[p] for p in layer.name.split(".") if p in ATTENTION), "other")', 'role = "other"'),
    ("groups without shape", "opdiff/methods/lora_over_select.py",
     'return f"{layer.kind}/{role}/{base.out_features}x{base.in_features}"', 'return f"{layer.kind}/{role}"'),
    ("N rounded instead of a ceiling", "opdiff/methods/lora_over_select.py",
     "n = math.ceil(self.config.select_fraction * size - 1e-9)", "n = round(self.config.select_fraction * size)"),
    ("MPOP keeps the scored LoRA (no restart from the base)", "opdiff/methods/lora_over_select.py",
     "chosen = self._choose(model, step, optimizer, per_round=None, restart=self.restarts)",
     "chosen = self._choose(model, step, optimizer, per_round=None, restart=False)"),
    ("MPO layout not Tables 5/7 (factors split evenly)", "opdiff/mpo.py",
     "return (a, *([1] * (m - 2)), n // a)", "return (1, *([1] * (m - 2)), n)"),
    ("gauges swapped", "opdiff/mpo.py", 'if gauge == "left":', 'if gauge != "left":'),
    ("LoRAOver built without its core count (an import-time constructor)", "opdiff/methods/lora_over.py",
     "        self.n_cores = n_cores\n", "        self.n_cores = None\n"),
    ("Selecting built without its name (an import-time constructor)", "opdiff/methods/lora_over_select.py",
     "super().__init__(name, summary, n_cores=lambda config: config.mpo_cores, **kw)",
     "super().__init__(summary, summary, n_cores=lambda config: config.mpo_cores, **kw)"),
    ("default core rate without the limit", "opdiff/methods/lora_over.py",
     "return min(rate, cap / n_cores**2) if cap > 0 else rate", "return rate"),
]


def main() -> int:
    caught = 0
    for label, rel, old, new in ERRORS:
        path = ROOT / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{rel}: the line to change for {label!r} is not there once; update this list")
        path.write_text(text.replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "2",
                                *TESTS], cwd=ROOT, capture_output=True, text=True, timeout=900)
        finally:
            path.write_text(text)
        failed = [line.split(" ")[1] for line in r.stdout.splitlines() if line.startswith("FAILED")]
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
        caught += bool(failed)
        print(f"- {label}: {summary}; first failing: {failed[0] if failed else 'none'}", flush=True)
    print(f"{caught} of {len(ERRORS)} deliberate errors caught")
    return 0 if caught == len(ERRORS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
