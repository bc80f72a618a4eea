"""Writes tfxfer's demo text dataset: short English sentences in five topic classes.

The demo recipe fine-tunes a pretrained sentence model on this data offline in minutes, so
the data is written by the project (this script) rather than downloaded. It is built to be
a fair test of transfer learning rather than of memorisation:

- Every sentence is one of many templates per class, filled from word lists, with neutral
  fillers (people, places, times) shared by all classes so they carry no label.
- The test split is worded partly differently from the train split: most of its sentences
  come from templates train never uses, and most of its class words (sports, dishes,
  devices, symptoms, ...) never occur in train. "volleyball", "the wok" or "a migraine"
  are easy for a model that already knows English and unknown to one that only counted
  train words. A person labels every sentence without hesitation.
- No sentence occurs twice, and none is another with only a person, place or time swapped,
  within a split or across the splits.

On the committed files, TF-IDF + logistic regression trained on train scores 0.99 in 5-fold
cross-validation on train but 0.83 on test; frozen all-MiniLM-L6-v2 embeddings (masked
mean) + logistic regression score 0.99 on test. That gap is what the demo shows.

Regenerate the committed files with the command below, from any directory (the output is
the same on every run, byte for byte):

    python tools/make_demo_text.py                  # writes tfxfer/demo_data/{train,test}.csv
    python tools/make_demo_text.py --out-dir /tmp/x
"""

from __future__ import annotations

import argparse
import csv
import random
import string
from pathlib import Path

SEED = 20240611
TRAIN_PER_CLASS = 80
TEST_PER_CLASS = 30
# Share of test sentences built from test-only templates, and of class words drawn from
# test-only word lists. The rest reuse train's, so test is "partly" new, not a new language.
TEST_TEMPLATE_SHARE = 0.7
TEST_WORD_SHARE = 0.75
MIN_WORDS, MAX_WORDS = 8, 25
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "tfxfer" / "demo_data"

# Fillers every class uses, the same in both splits: they must not give the label away.
SHARED_SLOTS: dict[str, list[str]] = {
    "person": [
        "my brother",
        "my aunt",
        "our neighbour",
        "a friend of mine",
        "my colleague",
        "my daughter",
        "my grandfather",
        "my flatmate",
        "our teacher",
        "my cousin",
        "my uncle",
        "my best friend",
    ],
    "when": [
        "on Saturday",
        "last night",
        "this morning",
        "yesterday afternoon",
        "on Monday evening",
        "earlier today",
        "last weekend",
        "on Friday",
        "last Sunday",
        "on Tuesday",
    ],
    "soon": [
        "on Saturday",
        "tomorrow",
        "tonight",
        "this weekend",
        "on Friday",
        "next week",
        "later today",
        "on Monday morning",
    ],
    "city": [
        "Leeds",
        "Lisbon",
        "Denver",
        "Osaka",
        "Cardiff",
        "Toronto",
        "Munich",
        "Dublin",
        "Austin",
        "Melbourne",
        "Glasgow",
        "Valencia",
    ],
}

# Per class: train templates, test-only templates, and class slots as
# (train words, test-only words). A template may use any class slot or shared slot.
CLASSES: dict[str, dict] = {
    "sports": {
        "train_templates": [
            "{team} {beat} their rivals in {event} {when} after {score} from {player}.",
            "{person} has started playing {sport} twice a week at the club near {city}.",
            "The crowd in {venue} went wild when {player} scored in {event}.",
            "Tickets for {event} in {city} sold out within an hour of going on sale.",
            "{player} was sent off early, so {team} played the rest of {event} with ten men.",
            "Our {sport} coach made us do extra drills because we lost {event}.",
            "{person} watched {event} on television and could not believe {score} at the end.",
            "{team} have won six games in a row and sit top of the {sport} league.",
            "{sport} training was cancelled {when}, so the squad watched a video of {event}.",
            "{player} signed a new three-year contract with {team} {when}.",
            "I still remember {score} that won {event} for {team} in {city}.",
            "{person} bought new boots and a kit before the {sport} season started.",
            "The manager praised {player} after {team} {beat} the champions {when}.",
            "The league fined {team} for fielding an ineligible player in {event}.",
        ],
        "test_templates": [
            "Can you believe {team} {beat} the favourites in {event} {when}?",
            "{person} got front-row seats in {venue} for {event} in {city}.",
            "Fans celebrated {score} that sealed the trophy for {team}.",
            "{player} pulled a hamstring during the warm-up and missed {event}.",
            "After years of practice, {person} finally joined an amateur {sport} league.",
            "Who do you think will lift the trophy after {event} this season?",
            "{team} {beat} a much stronger opponent, and {player} was named man of the match.",
            "Our {sport} team is recruiting new players who can practise on weekday evenings.",
            "The umpire halted play twice during {event} because of a heated dispute.",
            "{person} coaches a junior {sport} squad in {city} every weekend.",
        ],
        "slots": {
            "sport": (
                ["football", "tennis", "basketball", "rugby", "hockey", "netball"],
                [
                    "volleyball",
                    "cricket",
                    "baseball",
                    "badminton",
                    "handball",
                    "table tennis",
                    "water polo",
                    "lacrosse",
                ],
            ),
            "team": (
                [
                    "the home team",
                    "our local club",
                    "the visitors",
                    "the national side",
                    "the youth squad",
                    "the league leaders",
                ],
                [
                    "the hosts",
                    "the underdogs",
                    "the defending champions",
                    "the away side",
                    "the reigning champions",
                    "the newly promoted side",
                ],
            ),
            "player": (
                [
                    "the striker",
                    "the goalkeeper",
                    "the captain",
                    "the young forward",
                    "the left back",
                    "the star player",
                ],
                [
                    "the pitcher",
                    "the batsman",
                    "the point guard",
                    "the midfielder",
                    "the veteran winger",
                    "the wicketkeeper",
                    "the shortstop",
                ],
            ),
            "event": (
                [
                    "the final",
                    "the derby",
                    "the semi-final",
                    "the league match",
                    "the cup tie",
                    "the title decider",
                ],
                [
                    "the playoff",
                    "the tournament opener",
                    "the championship game",
                    "the quarter-final",
                    "the grand final",
                    "the relegation battle",
                ],
            ),
            "beat": (
                ["beat", "thrashed", "narrowly beat"],
                ["defeated", "edged past", "outplayed", "overpowered"],
            ),
            "score": (
                ["two goals", "a late penalty", "a brilliant header", "a long-range strike"],
                [
                    "a hat-trick",
                    "a last-second basket",
                    "a home run",
                    "a winning try",
                    "a stunning volley",
                    "a dramatic equaliser",
                ],
            ),
            "venue": (
                ["the stadium", "the packed stands"],
                ["the arena", "the ballpark", "the grandstand", "the sold-out velodrome"],
            ),
        },
    },
    "cooking": {
        "train_templates": [
            "{person} taught me how to make {dish} using only a few simple ingredients.",
            "The recipe says to add {ingredient} and let everything cook gently for {duration}.",
            "I burned {dish} {when} because I forgot to set the kitchen timer.",
            "We made {dish} for the whole family and there were no leftovers.",
            "Preheat {pan} before you start, otherwise the food will cook unevenly.",
            "My favourite cookbook has a simple recipe for {dish} with {ingredient}.",
            "Stir in the {ingredient} at the end so the flavour stays fresh.",
            "{person} is learning to cook and made {dish} {when} without any help.",
            "Add a little more {ingredient} if the sauce tastes too bland.",
            "{person} always scrubs the chopping board twice after cutting raw meat.",
            "The chef in {city} showed us how to fry onions until they turn golden.",
            "Leave {dish} to cool for {duration} before you serve it.",
            "I doubled the recipe for {dish} because twelve guests are coming for dinner.",
            "You can freeze {dish} for up to three months if you wrap it well.",
            "{person} added far too much {ingredient} to {dish}.",
        ],
        "test_templates": [
            "Could you pass me the {ingredient}? The pot of beans needs more flavour.",
            "{person} won a neighbourhood cooking contest with {dish}.",
            "Let the dough rest for {duration} before rolling it out on a floured worktop.",
            "Grandma's secret for {dish} is a generous spoonful of {ingredient}.",
            "I tried a new recipe {when} and made {dish} flavoured with {ingredient}.",
            "Season the meat with {ingredient} and cook it in {pan} until golden brown.",
            "How long should I heat {pan} before the sliced vegetables go in?",
            "My kitchen smelled of {ingredient} all afternoon after I made {dish}.",
            "{person} prepared {dish} for the dinner party in {city}.",
            "Whisk the eggs with a splash of milk, then fold in the {ingredient}.",
        ],
        "slots": {
            "dish": (
                [
                    "a lemon risotto",
                    "a chicken curry",
                    "a chocolate cake",
                    "a vegetable lasagne",
                    "a pot of tomato soup",
                    "some banana bread",
                    "a beef stew",
                ],
                [
                    "a mushroom omelette",
                    "a stack of pancakes",
                    "an apple crumble",
                    "a spicy noodle stir-fry",
                    "a loaf of sourdough",
                    "a fish pie",
                    "a tray of roasted vegetables",
                    "a plate of dumplings",
                ],
            ),
            "ingredient": (
                [
                    "garlic",
                    "fresh basil",
                    "butter",
                    "brown sugar",
                    "chopped onion",
                    "grated cheese",
                    "black pepper",
                    "lemon juice",
                ],
                [
                    "cinnamon",
                    "coriander",
                    "olive oil",
                    "ginger",
                    "nutmeg",
                    "soy sauce",
                    "smoked paprika",
                    "chilli flakes",
                ],
            ),
            "pan": (
                ["the oven", "a frying pan", "a large pot", "the grill"],
                ["the wok", "a cast-iron skillet", "the air fryer", "a roasting tin"],
            ),
            "duration": (
                ["twenty minutes", "half an hour", "an hour"],
                ["forty minutes", "ten minutes", "two hours"],
            ),
        },
    },
    "weather": {
        "train_templates": [
            "The forecast says {condition} will reach {city} {soon}.",
            "We had to cancel the picnic {when} because of {condition}.",
            "Temperatures dropped to {cold} overnight and {icy}.",
            "It was {hot} in {city} {when}, so {sunny}.",
            "The weather service issued a warning for {condition} across {region}.",
            "{person} told me to take {rain_gear} because the sky over {city} looks grey.",
            "The sun finally came out over {city} once {condition} had passed.",
            "The temperature in {city} climbed to {hot} {when}, breaking the old record.",
            "According to the forecast, it will be {sky} in {city} with a chance of {shower}.",
            "{person} checked the weather app and saw a warning about {condition}.",
            "The wind was so strong {when} that it blew down {blown}.",
            "{city} had {condition} {when}, and more unsettled weather is on the way.",
            "Thick clouds rolled in over {city} and {shower} started falling by lunchtime.",
            "We were stuck indoors all weekend because of {condition}.",
            "The {season} in {city} was the {extreme} anyone can remember.",
            "Expect {condition} in the north and mild, sunny spells in the south.",
        ],
        "test_templates": [
            "The meteorologist on the radio warned of {condition} arriving {soon}.",
            "Schools in {city} closed early because {condition} made the roads dangerous.",
            "Is it going to be {sky} or sunny in {city} {soon}?",
            "Forecasters expect {condition} to sweep across the country {soon}.",
            "Farmers near {city} are worried because it has not rained for six weeks.",
            "{person} got soaked in a sudden downpour on the way home {when}.",
            "The thermometer on our balcony showed {cold} at dawn.",
            "A rainbow appeared over {city} once the {shower} had passed.",
            "Flights from {city} were grounded {when} due to {condition}.",
            "The wind chill makes it feel like {cold} even though the sun is out.",
            "It has been drizzling in {city} since dawn and the clouds show no sign of clearing.",
        ],
        "slots": {
            "condition": (
                ["heavy rain", "strong winds", "thick fog", "snow", "a thunderstorm", "hail"],
                [
                    "a blizzard",
                    "freezing drizzle",
                    "gale-force gusts",
                    "sleet",
                    "a hurricane",
                    "icy showers",
                    "torrential rain",
                ],
            ),
            "cold": (
                ["minus five degrees", "zero degrees", "minus twelve degrees"],
                ["minus eight degrees Celsius", "minus twenty Celsius", "two degrees Celsius"],
            ),
            "hot": (
                ["thirty degrees", "thirty-five degrees", "twenty-eight degrees"],
                ["forty degrees Celsius", "a sweltering thirty-eight degrees"],
            ),
            "sky": (["cloudy", "grey", "dull"], ["overcast", "hazy", "misty"]),
            "icy": (
                ["the roads were covered in ice", "the pond froze over", "the car windows iced up"],
                ["the pavements turned into an ice rink", "the pipes froze solid"],
            ),
            "sunny": (
                [
                    "everyone stayed in the shade",
                    "the beaches were packed",
                    "the ice-cream vans sold out",
                ],
                ["people queued for the outdoor pools", "the tarmac started to melt"],
            ),
            "region": (
                ["coastal areas", "the hills", "the whole region"],
                ["the northern valleys", "the lowlands"],
            ),
            "shower": (
                ["showers", "light rain", "snow flurries"],
                ["drizzle", "hailstones", "thundery downpours"],
            ),
            "rain_gear": (
                ["an umbrella", "a raincoat", "wellington boots"],
                ["a waterproof poncho", "a windproof jacket"],
            ),
            "blown": (
                ["the fence in our garden", "a tree on our street", "the garden shed"],
                ["the scaffolding next door", "half the roof tiles", "the power lines"],
            ),
            "season": (["summer", "winter", "spring"], ["autumn", "monsoon season"]),
            "extreme": (
                ["wettest", "windiest", "greyest"],
                ["driest", "stormiest", "foggiest"],
            ),
        },
    },
    "technology": {
        "train_templates": [
            "{device} {issue} ever since I installed {update}.",
            "{person} bought {gadget} and spent the evening {setup}.",
            "The company released a patch that fixes {bug} in {software}.",
            "{person} spent the evening backing up {files} from {device} to the cloud.",
            "Our office switched to {new_system} {when} and nobody can log in.",
            "I need to reset my password because {software} locked me out again.",
            "A startup in {city} is building {invention}.",
            "{person} is learning to code in {language} to build {project}.",
            "The battery on {device} barely lasts three hours now.",
            "Download the latest version of {software} to get the new features.",
            "{device} {issue}, so I am taking it to the repair shop in {city}.",
            "The new {component} is twice as fast and uses less power than the old one.",
            "Restart {network_device} if the internet connection keeps dropping.",
        ],
        "test_templates": [
            "{gadget} arrived today, but the setup wizard crashed twice.",
            "Engineers in {city} unveiled a chip that runs AI models on a tiny battery.",
            "{person} upgraded the memory in {device} and it boots in seconds now.",
            "Hackers exploited a flaw in {software} to steal customer data.",
            "The developer conference in {city} focused on cloud computing and open-source tools.",
            "Does {software} sync across all my devices, or do I need a separate licence?",
            "{device} {issue}, so I sent it back to the manufacturer.",
            "I left {device} charging overnight but the screen is still black.",
            "Our team migrated the database to a new server {when} without any downtime.",
            "{person} is writing an app that translates speech into text in real time.",
        ],
        "slots": {
            "device": (
                ["my laptop", "the new phone", "the tablet", "my smartwatch", "my old phone"],
                [
                    "my e-reader",
                    "the games controller",
                    "my drawing tablet",
                    "the handheld console",
                    "the smart projector",
                    "my Chromebook",
                ],
            ),
            "gadget": (
                [
                    "a new laptop",
                    "a cheap tablet",
                    "a smartwatch",
                    "a wireless keyboard",
                    "a faster router",
                ],
                [
                    "a mechanical keyboard",
                    "a smart speaker",
                    "a games console",
                    "an e-reader",
                    "a solid-state drive",
                    "a VR headset",
                ],
            ),
            "software": (
                ["the app", "the operating system", "the browser", "the antivirus program"],
                [
                    "the firmware",
                    "the spreadsheet software",
                    "the password manager",
                    "the video editor",
                    "the chatbot",
                ],
            ),
            "issue": (
                [
                    "keeps crashing",
                    "will not connect to the wifi",
                    "runs very slowly",
                    "keeps showing an error message",
                ],
                [
                    "freezes on startup",
                    "drains the battery overnight",
                    "keeps losing its bluetooth connection",
                    "overheats after an hour",
                ],
            ),
            "update": (
                ["the latest update", "a new game", "the beta version of the app"],
                ["the newest firmware", "a third-party plugin"],
            ),
            "setup": (
                ["setting it up", "installing updates", "pairing it with my phone"],
                ["configuring the settings", "syncing all the accounts"],
            ),
            "bug": (
                ["a security bug", "a memory leak", "a login problem"],
                ["a data-loss bug", "a crash on startup"],
            ),
            "files": (
                ["photos", "old emails", "work documents"],
                ["videos", "game saves", "contacts"],
            ),
            "new_system": (
                [
                    "a new email server",
                    "a new cloud storage provider",
                    "a different video-call platform",
                ],
                ["a new single sign-on system", "a different project-management tool"],
            ),
            "invention": (
                [
                    "a robot that can sort recycling",
                    "a drone that delivers parcels",
                    "software that writes code",
                    "a self-driving delivery van",
                ],
                [
                    "a smart thermostat that learns your habits",
                    "an earpiece that translates speech",
                    "a satellite internet service",
                ],
            ),
            "language": (["Python", "JavaScript", "Java"], ["Rust", "Kotlin", "TypeScript"]),
            "project": (["a personal website", "a small game"], ["a mobile app", "a chatbot"]),
            "component": (
                ["processor", "graphics chip", "phone"],
                ["GPU", "memory chip", "server rack"],
            ),
            "network_device": (
                ["the router", "the modem", "the wifi extender"],
                ["the mesh network", "the network switch"],
            ),
        },
    },
    "health": {
        "train_templates": [
            "{professional} prescribed {medicine} after {person} complained of {symptom}.",
            "I have had {symptom} for three days, so I booked an appointment at {place}.",
            "{person} stayed in bed {when} with {symptom} and a temperature.",
            "Drink plenty of water and rest if you have {symptom}.",
            "The hospital in {city} is running a free flu vaccination clinic this month.",
            "{professional} checked my blood pressure and said it was a little high.",
            "{person} has been taking {medicine} twice a day since the operation.",
            "{professional} says enough sleep helps the immune system fight infections.",
            "The waiting room at {place} was full of people with {symptom}.",
            "After the operation, {person} needed two weeks to recover at home.",
            "Please do not take {medicine} on an empty stomach.",
            "{person} went to {place} {when} because of {symptom}.",
        ],
        "test_templates": [
            "{person} woke up with {symptom} and called {professional} {when}.",
            "Is it safe to use {medicine} during pregnancy, or should I ask {professional}?",
            "{professional} referred me for an X-ray after the fall.",
            "Symptoms such as {symptom} can be an early sign of an allergy.",
            "{person} waited four hours at {place} for the blood test results.",
            "My prescription for {medicine} ran out, so I need a repeat from {professional}.",
            "The vaccination centre in {city} opens early for elderly patients.",
            "{professional} recommended {medicine} and plenty of rest for {symptom}.",
            "Since starting physiotherapy, {person} no longer needs a walking stick.",
            "Wash your hands often to stop the infection from spreading to others.",
        ],
        "slots": {
            "symptom": (
                [
                    "a sore throat",
                    "a high fever",
                    "a bad headache",
                    "back pain",
                    "a persistent cough",
                    "an upset stomach",
                ],
                [
                    "a runny nose",
                    "dizziness",
                    "a skin rash",
                    "chest tightness",
                    "a migraine",
                    "swollen ankles",
                    "an earache",
                ],
            ),
            "professional": (
                ["the doctor", "the nurse", "my GP", "the pharmacist"],
                [
                    "the physician",
                    "a specialist",
                    "the paediatrician",
                    "the dermatologist",
                    "the physiotherapist",
                ],
            ),
            "medicine": (
                ["antibiotics", "painkillers", "cough syrup", "vitamin D tablets"],
                [
                    "an antihistamine",
                    "ibuprofen",
                    "a course of steroids",
                    "iron supplements",
                    "aspirin",
                ],
            ),
            "place": (
                ["the clinic", "the hospital", "the pharmacy"],
                ["the surgery", "the emergency department", "the health centre"],
            ),
        },
    },
}


def _slot_names(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _sentence(
    rng: random.Random, template: str, class_slots: dict, held_out: bool
) -> tuple[str, tuple[str, ...]]:
    """Fills one template; held-out sentences mostly draw class words from test-only lists.

    Returns the sentence and its "content": the template and its class words, without the
    shared fillers.
    """
    values = {}
    for name in _slot_names(template):
        if name in SHARED_SLOTS:
            values[name] = rng.choice(SHARED_SLOTS[name])
        else:
            train_words, test_words = class_slots[name]
            use_test_words = held_out and rng.random() < TEST_WORD_SHARE
            values[name] = rng.choice(test_words if use_test_words else train_words)
    text = template.format(**values)
    content = (template, *(values[name] for name in sorted(values) if name not in SHARED_SLOTS))
    return text[0].upper() + text[1:], content


def make_splits(seed: int = SEED) -> dict[str, list[tuple[str, str]]]:
    """Returns {"train": [(text, label), ...], "test": [...]}, balanced and without repeats.

    Two sentences never share their content (template and class words), so no sentence is
    another one with only a person, place or time swapped, within a split or across them.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, spec in CLASSES.items():
            rows: list[tuple[str, str]] = []
            attempts = 0
            while len(rows) < per_class:
                attempts += 1
                if attempts > 10_000:
                    raise RuntimeError(f"Too few distinct {split} sentences for {label!r}.")
                if split == "train":
                    template, held_out = rng.choice(spec["train_templates"]), False
                else:
                    held_out = True
                    templates = (
                        spec["test_templates"]
                        if rng.random() < TEST_TEMPLATE_SHARE
                        else spec["train_templates"]
                    )
                    template = rng.choice(templates)
                text, content = _sentence(rng, template, spec["slots"], held_out)
                if content in seen or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                    continue
                seen.add(content)
                rows.append((text, label))
            splits[split].extend(rows)
        rng.shuffle(splits[split])
    return splits


def write_splits(out_dir: Path, seed: int = SEED) -> dict[str, Path]:
    """Writes train.csv and test.csv (columns text,label, UTF-8, "\\n" line ends)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in make_splits(seed).items():
        path = out_dir / f"{split}.csv"
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="Directory for train.csv and test.csv. Defaults to %(default)s.",
    )
    parser.add_argument(
        "--seed", type=int, default=SEED, help="Random seed; the committed files use the default."
    )
    args = parser.parse_args(argv)
    paths = write_splits(args.out_dir, args.seed)
    for path in paths.values():
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
