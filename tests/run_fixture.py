"""A complete tiny run folder, as ``bigrec demo`` leaves one, built locally in seconds.

Layout (``run.yaml`` points at each part, paths relative to the folder):

- ``base/``: a tiny random Llama whose tokenizer was trained on these titles;
- ``data/``: ``bigrec prepare`` output of a small ml-100k-format dataset (20 movies, 12 users);
- ``adapter/``: a LoRA adapter taught two answers (see :data:`TAUGHT`), so that generation,
  grounding and ranking can be checked against known titles;
- ``index.safetensors``: the item index (``bigrec.grounding.index.ensure_index``) of the base model;
- ``sasrec/``: a small SASRec trained by ``bigrec baseline``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import make_tiny_model

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
          "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)", "Sabrina (1995)",
          "Mortal Kombat (1995)", "Usual Suspects, The (1995)", "Braveheart (1995)", "Apollo 13 (1995)",
          "Batman Forever (1995)", "Clueless (1995)", "Dead Man Walking (1995)", "Twelve Monkeys (1995)",
          "Seven (Se7en) (1995)", "Heat (1995)"]  # the last one repeats a title: two ids, one title

# history -> the answer the adapter is taught (histories end differently, answers differ)
TAUGHT = [(["Toy Story (1995)", "Heat (1995)"], "Casino (1995)"),
          (["Heat (1995)", "Babe (1995)"], "Jumanji (1995)")]

# Amazon product titles as they come (100 to 200 characters, model numbers, slash-joined words):
# the page must lay these out, not only movie titles (``build_run(titles=LONG_TITLES, ...)``).
LONG_TITLES = [
    "Gorilla Glue Heavy Duty Construction Adhesive, 9 Ounce Cartridge, Tan, (Pack of 1) - Industrial Grade "
    "Bonding for Wood/Metal/Ceramic/Stone/Concrete/Brick",
    "Loctite PL Premium Polyurethane Construction Adhesive, 10 Fluid Ounce Cartridge, Tan, Pack of 12 - "
    "Weatherproof Indoor/Outdoor Bond for Subfloors/Decks/Landscaping/Masonry",
    "DEWALT 20V MAX Cordless Drill Combo Kit, Brushless, 2-Tool Set with Impact Driver, Batteries and "
    "Charger Included (DCK277C2)",
    "Anker PowerCore Essential 20000mAh Portable Charger, USB-C Power Bank with PowerIQ Technology for "
    "iPhone 15/14/13/12/11/XR/XS/X/8, Samsung Galaxy S23/S22 and More (Black)",
    "Amazon Basics High-Speed HDMI Cable (18Gbps, 4K/60Hz), 6 Feet, Supports Ethernet, 3D, Audio Return, "
    "Black, 2-Pack",
    "Scotch Heavy Duty Shipping Packaging Tape, 1.88 Inches x 54.6 Yards, 6 Rolls with Dispenser, "
    "Great for Packing, Shipping and Moving (142-6)",
    "WD-40 Multi-Use Product with Smart Straw Sprays 2 Ways, 12 OZ [2-Pack] - Lubricant, Rust Remover, "
    "Degreaser and Moisture Displacer",
    "Rust-Oleum 249126 Painter's Touch 2X Ultra Cover Spray Paint, 12 oz, Flat Black, Pack of 6 - "
    "Indoor/Outdoor Use on Wood, Plastic, Metal and More",
    "Gorilla Super Glue Gel XL, Clear Glue, 25 Gram, (Pack of 1) - No Run Control Gel Formula for "
    "Vertical Surfaces, Anti-Clog Cap",
    "Duck Brand EZ Start Packaging Tape with Dispenser, 1.88 Inch x 22.2 Yard, Crystal Clear, "
    "6 Rolls (287279) - Cuts Cleanly, Starts Easily",
    "BLACK+DECKER 20V MAX Cordless Drill/Driver with 30-Piece Accessories, 3/8 Inch, Lithium Ion "
    "Battery and Charger Included (LD120VA)",
    "SAMSUNG 65-Inch Class Crystal UHD 4K DU7200 Series HDR Smart TV with Object Tracking Sound Lite, "
    "Motion Xcelerator, Mega Contrast, Q-Symphony (UN65DU7200, 2024 Model)",
    "Apple AirPods Pro (2nd Generation) Wireless Ear Buds with USB-C Charging, Up to 2X More Active "
    "Noise Cancelling Bluetooth Headphones, Transparency Mode",
    "Logitech MX Master 3S Wireless Performance Mouse with Ultra-fast Scrolling, Ergonomic, 8K DPI, "
    "Track on Glass, Quiet Clicks, USB-C, Bluetooth, Windows/Linux/Chrome/Mac - Graphite",
    "3M Scotch-Brite Heavy Duty Scrub Sponges, 9 Sponges, Stands Up to Grease and Grime, Kitchen, "
    "Bathroom and Household Cleaning (Pack of 9)",
    "Stanley 33-425 PowerLock 25-Foot by 1-Inch Measuring Tape with Blade Armor Coating, Belt Clip and "
    "Easy-to-Read Markings, Chrome/Yellow",
    "Energizer MAX AA Batteries and AAA Batteries Combo Pack, 24 AA and 24 AAA Batteries (48 Count), "
    "Long-Lasting Alkaline Double A and Triple A Batteries",
    "Cuisinart DCC-3200P1 Perfectemp Coffee Maker, 14 Cup Programmable with Glass Carafe, Stainless "
    "Steel, Brew Strength Control and 24-Hour Programmability",
    "Hamilton Beach FlexBrew Trio 2-Way Coffee Maker, Compatible with K-Cup Pods or Grounds, Combo, "
    "Single Serve and Full 12c Pot, Black with Stainless Accents (49904)",
    "Ziploc Gallon Food Storage Freezer Bags, New Grip 'n Seal Handles with Easy to Open Tabs, Stay Open "
    "Design with Stand-Up Bottom, 120 Count (4 Boxes of 30)",
]
LONG_TAUGHT = [([LONG_TITLES[0], LONG_TITLES[5]], LONG_TITLES[6]),
               ([LONG_TITLES[5], LONG_TITLES[7]], LONG_TITLES[8])]


def write_raw(root: Path, titles: list[str] = TITLES) -> Path:
    """ml-100k layout (``u.data``, ``u.item``): 12 users with 6 or 7 ratings each."""
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    lines = []
    for user in range(1, 13):
        for step in range(6 + user % 2):
            item = (user * 3 + step * (1 + user % 4)) % len(titles) + 1
            lines.append(f"{user}\t{item}\t{1 + (user + step) % 5}\t{1000 * step + user}\n")
    (folder / "u.data").write_text("".join(lines))
    (folder / "u.item").write_bytes("".join(f"{n}|{t}|01-Jan-1995||http://x|0|1\n"
                                            for n, t in enumerate(titles, start=1)).encode("latin-1"))
    return folder


def teach_adapter(base: str, out: Path, steps: int = 60, taught: list = TAUGHT) -> None:
    """A LoRA adapter trained (full batch, response-only loss) to answer ``taught`` (:data:`TAUGHT`)."""
    from peft import LoraConfig, get_peft_model

    from bigrec.data.prompts import DOMAINS, instruction_row, prompt_for_row
    from bigrec.llm.models import load_model

    model, tok = load_model(base, "fp32", device="cpu", for_training=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    rows = [instruction_row(DOMAINS["movie"], history, answer) for history, answer in taught]
    enc = tok([prompt_for_row(r, with_output=True) + tok.eos_token for r in rows], return_tensors="pt",
              padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, row in enumerate(rows):
        labels[i, : len(tok(prompt_for_row(row))["input_ids"])] = -100
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)


def build_run(root: Path, with_sasrec: bool = True, titles: list[str] = TITLES, taught: list = TAUGHT,
              use_ci: bool = False, ranking_note: str | None = None) -> Path:
    """Build the run folder under ``root`` and return it. The defaults give :func:`tiny_run`'s run;
    ``titles``/``taught`` swap the catalogue (:data:`LONG_TITLES`), ``use_ci``/``ranking_note`` set
    run.yaml's default ranking as ``bigrec demo`` does."""
    from bigrec.app.run_manifest import RunManifest
    from bigrec.cli import main
    from bigrec.grounding.index import ensure_index

    run = root / "run"
    run.mkdir(parents=True)
    base = make_tiny_model(run / "base", "llama", texts=titles)
    raw = write_raw(root / "raw", titles)
    if main(["prepare", "--dataset", "ml-100k", "--source", str(raw), "--out", str(run / "data")]) != 0:
        raise RuntimeError("bigrec prepare failed on the fixture data")
    teach_adapter(base, run / "adapter", taught=taught)
    ensure_index(base, run / "data" / "id2name.txt", run / "index.safetensors", "fp32")
    if with_sasrec:
        rc = main(["baseline", "--model", "sasrec", "--data", str(run / "data"), "--output_dir", str(run / "sasrec"),
                   "--hidden", "16", "--layers", "1", "--epochs", "3", "--patience", "3", "--threads", "1"])
        if rc != 0:
            raise RuntimeError("bigrec baseline failed on the fixture data")
    RunManifest(base_model="base", sasrec="sasrec" if with_sasrec else None, precision="fp32", num_beams=2,
                max_new_tokens=12, ci_gamma=0.5 if with_sasrec else None, use_ci=use_ci,
                ranking_note=ranking_note).save(run)
    return run


_BUILT: dict[str, Path] = {}


def tiny_run(tmp_path_factory) -> Path:
    """The run folder, built once per test session (shared by every test module)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = build_run(tmp_path_factory.mktemp("tiny-run"))
    return _BUILT[key]
