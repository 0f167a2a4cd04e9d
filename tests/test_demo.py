from experiments import demo


def test_demo_runs_and_variance_allocation_beats_uniform(capsys):
    demo.main(["--prompts", "32", "--steps", "3", "--seed", "1"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    # columns: name, sum n, sum sigma^2/n, vs uniform, wasted
    assert rows["uniform"][1] == rows["variance"][1] == rows["official"][1] == "512"
    assert float(rows["variance"][3]) < 1.0
    assert float(rows["variance"][4].rstrip("%")) < float(rows["uniform"][4].rstrip("%"))
    assert "beta_comp_pos_mean" in out
