"""The before/after chart at the top of the review sheet: one group of bars per metric, one bar per configuration,
drawn with PIL (already a dependency) as a PNG."""

import io

from PIL import Image, ImageDraw, ImageFont

from idefics_cog.evaluation.report import ROWS, labels

COLORS = ["#8c8c8c", "#1f6fb4", "#d9822b", "#3a9b5c"]  # the first configuration (the "before") in grey
WIDTH, LEFT, RIGHT, TOP, BAR, GAP = 900, 230, 70, 56, 18, 14


def png(results: list[dict]) -> bytes:
    rows = [(title, key) for title, key in ROWS if any(r["metrics"][key] is not None for r in results)]
    height = TOP + len(rows) * (len(results) * BAR + GAP) + 34
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    span = WIDTH - LEFT - RIGHT
    x = LEFT
    for index, label in enumerate(labels(results)):  # the legend
        color = COLORS[index % len(COLORS)]
        draw.rectangle([x, 14, x + 14, 28], fill=color)
        draw.text((x + 20, 13), label, fill="black", font=font)
        x += 40 + int(draw.textlength(label, font=font))
    bottom = height - 34 - GAP
    for tick in range(0, 101, 25):  # the scale, in %, under the bars
        x = LEFT + span * tick / 100
        draw.line([x, TOP - 6, x, bottom], fill="#dddddd")
        draw.text((x - 8, bottom + 4), f"{tick}", fill="#555555", font=small)
    draw.line([LEFT, TOP - 6, LEFT, bottom], fill="black")
    y = TOP
    for title, key in rows:
        draw.text((10, y + (len(results) * BAR) / 2 - 8), title, fill="black", font=font)
        for index, result in enumerate(results):
            value = result["metrics"][key]
            if value is not None:
                right = LEFT + max(1, round(span * value))
                draw.rectangle([LEFT, y, right, y + BAR - 3], fill=COLORS[index % len(COLORS)])
            draw.text(((right if value is not None else LEFT) + 5, y + 1),
                      "n/a" if value is None else f"{100 * value:.1f}", fill="black", font=small)
            y += BAR
        y += GAP
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()
