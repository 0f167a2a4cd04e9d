"""The README's code example runs as written, so it never goes stale."""

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    block = re.search(
        r"<!-- README-EXAMPLE:START -->\s*```python\n(.*?)```\s*<!-- README-EXAMPLE:END -->",
        text,
        re.S,
    )
    assert block, "README example markers not found"
    namespace: dict = {}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    loss, grad, aux = namespace["loss"], namespace["grad"], namespace["aux"]
    assert math.isfinite(float(loss))
    assert grad.shape == namespace["logits"].shape and float(abs(grad).sum()) > 0
    assert float(aux["beta_comp_pos_mean"]) > 1.0  # the boost is active on A > 0 tokens
    assert "loss" in capsys.readouterr().out


def test_readme_commands_match_ci():
    """CI must run exactly the README's test command."""
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd.strip() in ci
