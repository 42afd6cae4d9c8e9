"""A fixed set of short factual questions with checkable answers, for the real-model lab.

Written for this repository (no external source; Apache-2.0 like the rest of it): capitals,
continents, languages, opposites, counts, small arithmetic, chemical symbols, authors,
general knowledge and day/month order. Each question comes with the start of its answer (a
*stem*, such as "The capital of France is"); the model continues the stem, and the first
sentence of the continuation is checked. A stem keeps a 135M model's answers short and
checkable without changing what is asked.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Item:
    """One question: the user's text, the answer's stem, and the accepted answers."""

    category: str
    question: str
    stem: str
    answers: tuple[str, ...]  # accepted spellings, whole words; numbers: the value as text
    numeric: bool = False
    case_sensitive: bool = False  # chemical symbols: "Au", not "au"

    def check(self, continuation: str) -> bool:
        """Whether the continuation's first sentence gives an accepted answer."""
        span = first_sentence(continuation)
        if self.numeric:
            value = first_number(span)
            return value is not None and str(value) in self.answers
        text = span if self.case_sensitive else fold(span)
        for answer in self.answers:
            target = answer if self.case_sensitive else fold(answer)
            if re.search(rf"(?<![\w]){re.escape(target)}(?![\w])", text):
                return True
        return False


def fold(text: str) -> str:
    """Lower case without accents."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def first_sentence(text: str) -> str:
    """Up to the first sentence end (. ! ? then space or end) or line break."""
    match = re.search(r"[.!?](?=\s|$)|\n", text)
    return text[: match.start()] if match else text


def first_number(text: str) -> int | None:
    """The first number in ``text``, in digits or as an English number word."""
    for match in re.finditer(r"\d[\d,]*|[A-Za-z]+", text):
        token = match.group(0)
        if token[0].isdigit():
            return int(token.replace(",", ""))
        if token.lower() in NUMBER_WORDS:
            return NUMBER_WORDS[token.lower()]
    return None


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "the United Kingdom": "London",
    "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi|Delhi",
    "Brazil": "Brasília|Brasilia", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Hungary": "Budapest", "the Czech Republic": "Prague",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern|Berne",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "South Korea": "Seoul", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogotá|Bogota", "Cuba": "Havana", "Ukraine": "Kyiv|Kiev",
    "the Philippines": "Manila", "Pakistan": "Islamabad", "Afghanistan": "Kabul",
    "Lebanon": "Beirut", "Syria": "Damascus", "Morocco": "Rabat", "Ethiopia": "Addis Ababa",
    "New Zealand": "Wellington", "Scotland": "Edinburgh", "Venezuela": "Caracas",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Iceland": "Reykjavik",
    "Malaysia": "Kuala Lumpur", "Nepal": "Kathmandu",
}  # fmt: skip

CONTINENTS = {
    "Kenya": "Africa", "Nigeria": "Africa", "Egypt": "Africa", "Ghana": "Africa",
    "Ethiopia": "Africa", "Morocco": "Africa", "Brazil": "South America",
    "Argentina": "South America", "Peru": "South America", "Chile": "South America",
    "Colombia": "South America", "Bolivia": "South America", "France": "Europe",
    "Germany": "Europe", "Italy": "Europe", "Spain": "Europe", "Poland": "Europe",
    "Sweden": "Europe", "Norway": "Europe", "Japan": "Asia", "China": "Asia", "India": "Asia",
    "Thailand": "Asia", "Vietnam": "Asia", "Pakistan": "Asia", "Nepal": "Asia",
    "Indonesia": "Asia", "Canada": "North America", "Mexico": "North America",
    "the United States": "North America",
}  # fmt: skip

LANGUAGES = {
    "Brazil": "Portuguese", "Mexico": "Spanish", "France": "French", "Germany": "German",
    "Japan": "Japanese", "China": "Chinese|Mandarin", "Italy": "Italian", "Russia": "Russian",
    "Spain": "Spanish", "Portugal": "Portuguese", "Greece": "Greek", "the Netherlands": "Dutch",
    "Sweden": "Swedish", "Poland": "Polish", "Turkey": "Turkish", "South Korea": "Korean",
    "Egypt": "Arabic", "Argentina": "Spanish", "Iran": "Persian|Farsi", "Israel": "Hebrew",
    "Thailand": "Thai", "Vietnam": "Vietnamese", "Finland": "Finnish|Swedish",
    "Norway": "Norwegian", "Denmark": "Danish", "Hungary": "Hungarian", "Ukraine": "Ukrainian",
}  # fmt: skip

OPPOSITES = {
    "hot": "cold", "big": "small|little", "up": "down", "day": "night", "black": "white",
    "happy": "sad|unhappy", "fast": "slow", "old": "young|new", "open": "closed|shut|close",
    "rich": "poor", "wet": "dry", "full": "empty", "early": "late", "high": "low",
    "in": "out", "left": "right", "long": "short", "love": "hate", "strong": "weak",
    "thick": "thin", "win": "lose", "push": "pull", "buy": "sell", "true": "false",
    "inside": "outside", "north": "south", "east": "west", "top": "bottom", "loud": "quiet",
    "clean": "dirty", "cheap": "expensive", "deep": "shallow", "good": "bad|evil",
    "alive": "dead", "friend": "enemy|foe", "question": "answer", "remember": "forget",
    "before": "after", "always": "never", "male": "female", "heavy": "light",
    "light": "dark|heavy", "hard": "soft|easy", "start": "end|finish|stop",
    "accept": "reject|refuse|decline",
}  # fmt: skip

COUNTS = [
    ("How many legs does a spider have?", "A spider has", 8),
    ("How many legs does an insect have?", "An insect has", 6),
    ("How many legs does a dog have?", "A dog has", 4),
    ("How many days are in a week?", "A week has", 7),
    ("How many months are in a year?", "A year has", 12),
    ("How many hours are in a day?", "A day has", 24),
    ("How many minutes are in an hour?", "An hour has", 60),
    ("How many seconds are in a minute?", "A minute has", 60),
    ("How many days are in a leap year?", "A leap year has", 366),
    ("How many days are in a year that is not a leap year?", "A common year has", 365),
    ("How many sides does a triangle have?", "A triangle has", 3),
    ("How many sides does a square have?", "A square has", 4),
    ("How many sides does a pentagon have?", "A pentagon has", 5),
    ("How many sides does a hexagon have?", "A hexagon has", 6),
    ("How many sides does an octagon have?", "An octagon has", 8),
    ("How many continents are there?", "There are", 7),
    ("How many planets are in the solar system?", "The solar system has", 8),
    ("How many wheels does a bicycle have?", "A bicycle has", 2),
    ("How many wheels does a tricycle have?", "A tricycle has", 3),
    ("How many players are on a soccer team on the field?", "A soccer team has", 11),
    ("How many strings does a violin have?", "A violin has", 4),
    ("How many strings does a standard guitar have?", "A standard guitar has", 6),
    ("How many arms does an octopus have?", "An octopus has", 8),
    ("At what temperature in Celsius does water freeze?", "Water freezes at", 0),
    ("At what temperature in Celsius does water boil at sea level?", "Water boils at", 100),
    ("How many cents are in a dollar?", "A dollar has", 100),
    ("How many things are in a dozen?", "A dozen is", 12),
    ("How many years are in a century?", "A century is", 100),
    ("How many years are in a decade?", "A decade is", 10),
    ("How many years are in a millennium?", "A millennium is", 1000),
    ("How many fingers are on one human hand?", "One human hand has", 5),
    ("How many legs does a bird have?", "A bird has", 2),
    ("How many hearts does a human have?", "A human has", 1),
    ("How many eyes does a human have?", "A human has", 2),
]

SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "oxygen": "O", "hydrogen": "H", "carbon": "C",
    "sodium": "Na", "potassium": "K", "helium": "He", "nitrogen": "N", "calcium": "Ca",
    "copper": "Cu", "lead": "Pb", "mercury": "Hg", "zinc": "Zn", "tin": "Sn", "sulfur": "S",
    "chlorine": "Cl", "neon": "Ne", "uranium": "U", "magnesium": "Mg", "aluminium": "Al",
    "silicon": "Si", "phosphorus": "P", "lithium": "Li",
}  # fmt: skip

AUTHORS = {
    "Romeo and Juliet": "Shakespeare", "Hamlet": "Shakespeare", "Macbeth": "Shakespeare",
    "Pride and Prejudice": "Austen", "Nineteen Eighty-Four": "Orwell",
    "Animal Farm": "Orwell", "the Harry Potter books": "Rowling", "the Odyssey": "Homer",
    "the Iliad": "Homer", "Don Quixote": "Cervantes", "War and Peace": "Tolstoy",
    "Anna Karenina": "Tolstoy", "Oliver Twist": "Dickens", "A Christmas Carol": "Dickens",
    "Great Expectations": "Dickens", "Moby-Dick": "Melville",
    "The Adventures of Tom Sawyer": "Twain", "Adventures of Huckleberry Finn": "Twain",
    "On the Origin of Species": "Darwin", "Frankenstein": "Shelley", "Dracula": "Stoker",
    "The Hobbit": "Tolkien", "The Lord of the Rings": "Tolkien",
    "the Sherlock Holmes stories": "Doyle", "Les Misérables": "Hugo",
    "the Divine Comedy": "Dante|Alighieri", "Faust": "Goethe", "The Great Gatsby": "Fitzgerald",
    "Crime and Punishment": "Dostoevsky|Dostoyevsky",
    "Alice's Adventures in Wonderland": "Carroll",
}  # fmt: skip

GENERAL = [
    ("What color is the sky on a clear day?", "On a clear day the sky is", "blue"),
    ("What color is grass?", "Grass is", "green"),
    ("What color is snow?", "Snow is", "white"),
    ("What color is a ripe banana?", "A ripe banana is", "yellow"),
    ("What color are ripe strawberries?", "Ripe strawberries are", "red"),
    ("What is the largest planet in the solar system?",
     "The largest planet in the solar system is", "Jupiter"),
    ("Which planet is known as the Red Planet?", "The Red Planet is", "Mars"),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the", "Pacific"),
    ("What is the name of Earth's natural satellite?", "Earth's natural satellite is the",
     "Moon"),
    ("What is the star at the center of our solar system?",
     "The star at the center of our solar system is the", "Sun"),
    ("What gas do plants take in from the air for photosynthesis?",
     "For photosynthesis, plants take in", "carbon dioxide|CO2"),
    ("What gas do humans need to breathe to live?", "To live, humans need to breathe",
     "oxygen"),
    ("What does water turn into when it freezes?", "When water freezes, it turns into",
     "ice"),
    ("What is the largest animal on Earth?", "The largest animal on Earth is the",
     "blue whale"),
    ("What is the fastest land animal?", "The fastest land animal is the", "cheetah"),
    ("What is the tallest animal?", "The tallest animal is the", "giraffe"),
    ("Which animal is called the king of the jungle?", "The king of the jungle is the",
     "lion"),
    ("What is a baby cat called?", "A baby cat is called a", "kitten"),
    ("What is a baby dog called?", "A baby dog is called a", "puppy|pup"),
    ("What is a baby cow called?", "A baby cow is called a", "calf"),
    ("What is a baby sheep called?", "A baby sheep is called a", "lamb"),
    ("What is a baby horse called?", "A baby horse is called a", "foal|colt|filly"),
    ("What is a young frog called?", "A young frog is called a", "tadpole|froglet"),
    ("What sweet food do bees make?", "Bees make", "honey"),
    ("What is the hardest natural substance?", "The hardest natural substance is",
     "diamond"),
    ("What is H2O commonly called?", "H2O is commonly called", "water"),
    ("Which organ pumps blood through the body?", "The organ that pumps blood is the",
     "heart"),
    ("Which organ do we think with?", "We think with our", "brain"),
    ("Which organs do we breathe with?", "We breathe with our", "lungs"),
    ("What is the largest hot desert in the world?", "The largest hot desert is the",
     "Sahara"),
    ("What is the longest river in Africa?", "The longest river in Africa is the", "Nile"),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is",
     "Everest"),
    ("Who was the first president of the United States?",
     "The first president of the United States was", "Washington"),
    ("Who invented the telephone?", "The telephone was invented by", "Bell"),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by",
     "Leonardo|da Vinci|Vinci"),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by",
     "Einstein"),
    ("Who was the first person to walk on the Moon?",
     "The first person to walk on the Moon was", "Armstrong"),
    ("What is the currency of Japan?", "The currency of Japan is the", "yen"),
    ("What is the currency of the United States?", "The currency of the United States is the",
     "dollar"),
    ("What is the currency of the United Kingdom?", "The currency of the United Kingdom is the",
     "pound"),
    ("What currency do Germany and France use?", "Germany and France use the", "euro"),
    ("What is the currency of India?", "The currency of India is the", "rupee"),
    ("What is the currency of Russia?", "The currency of Russia is the", "ruble|rouble"),
    ("What do bees live in?", "Bees live in a", "hive|beehive"),
    ("What do caterpillars turn into?", "Caterpillars turn into",
     "butterflies|butterfly|moths|moth"),
    ("What is frozen water called?", "Frozen water is called", "ice"),
    ("What do cows drink?", "Cows drink", "water"),
    ("What is the main ingredient of bread?", "The main ingredient of bread is", "flour|wheat"),
    ("What fruit is used to make wine?", "Wine is made from", "grapes|grape"),
    ("What do you call a shape with three sides?", "A shape with three sides is called a",
     "triangle"),
]  # fmt: skip

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip

ARITHMETIC = [
    (2, "+", 3), (4, "+", 5), (1, "+", 1), (6, "+", 2), (7, "+", 5), (3, "+", 4),
    (8, "+", 1), (9, "+", 9), (5, "+", 5), (10, "+", 10), (12, "+", 3), (20, "+", 7),
    (15, "+", 15), (11, "+", 4), (30, "+", 20), (100, "+", 50), (6, "+", 7), (8, "+", 8),
    (9, "-", 3), (10, "-", 4), (7, "-", 2), (5, "-", 1), (20, "-", 5), (15, "-", 10),
    (100, "-", 1), (50, "-", 25), (8, "-", 6), (12, "-", 6), (2, "*", 3), (3, "*", 3),
    (4, "*", 5), (10, "*", 10), (2, "*", 8), (6, "*", 2), (5, "*", 5), (7, "*", 1),
    (10, "*", 3), (9, "*", 2), (3, "*", 4), (1, "*", 6),
]  # fmt: skip


def _aliases(text: str) -> tuple[str, ...]:
    return tuple(text.split("|"))


def items() -> list[Item]:
    """The whole set, in a fixed order (367 items)."""
    out: list[Item] = []
    for country, city in CAPITALS.items():
        out.append(
            Item("capital", f"What is the capital of {country}?",
                 f"The capital of {country} is", _aliases(city))
        )  # fmt: skip
    for country, continent in CONTINENTS.items():
        name = country[0].upper() + country[1:]
        out.append(
            Item("continent", f"On which continent is {country}?",
                 f"{name} is located on the continent of", _aliases(continent))
        )  # fmt: skip
    for country, language in LANGUAGES.items():
        out.append(
            Item("language", f"What is the official language of {country}?",
                 f"The official language of {country} is", _aliases(language))
        )  # fmt: skip
    for word, opposite in OPPOSITES.items():
        out.append(
            Item("opposite", f'What is the opposite of "{word}"?',
                 f'The opposite of "{word}" is', _aliases(opposite))
        )  # fmt: skip
    for question, stem, value in COUNTS:
        out.append(Item("count", question, stem, (str(value),), numeric=True))
    for a, op, b in ARITHMETIC:
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        sign = {"+": "+", "-": "-", "*": "×"}[op]
        out.append(
            Item("arithmetic", f"What is {a} {sign} {b}?", f"{a} {sign} {b} =",
                 (str(value),), numeric=True)
        )  # fmt: skip
    for element, symbol in SYMBOLS.items():
        out.append(
            Item("symbol", f"What is the chemical symbol for {element}?",
                 f"The chemical symbol for {element} is", (symbol,), case_sensitive=True)
        )  # fmt: skip
    for title, author in AUTHORS.items():
        name = title[0].upper() + title[1:]
        out.append(
            Item("author", f"Who wrote {title}?", f"{name} was written by", _aliases(author))
        )
    for question, stem, answer in GENERAL:
        out.append(Item("general", question, stem, _aliases(answer)))
    for names, unit in ((DAYS, "day"), (MONTHS, "month")):
        for i, current in enumerate(names):
            following = names[(i + 1) % len(names)]
            out.append(
                Item("order", f"What {unit} comes after {current}?",
                     f"The {unit} after {current} is", (following,))
            )  # fmt: skip
    return out


TOPICS = [
    "a lighthouse keeper", "autumn in a forest", "a busy market", "learning to swim",
    "a rainy afternoon", "the first day of school", "a lost dog", "baking bread",
    "a trip to the mountains", "an old library", "a city at night", "a garden in spring",
    "a train journey", "a small fishing village", "a snowy morning", "a birthday party",
    "a visit to a museum", "a broken bicycle", "a new neighbour", "a summer festival",
    "the ocean at dawn", "a family dinner", "a friendly robot", "a secret map",
    "a music lesson", "a football match", "a long walk home", "a thunderstorm",
    "a picnic by a lake", "an old photograph", "a desert road", "a child's first drawing",
    "a bakery at dawn", "a quiet café", "the moon landing", "a beekeeper",
    "a farmer's year", "a mountain cabin", "a night sky full of stars", "a ship in a storm",
    "a young inventor", "a talking parrot", "a forgotten key", "a winter market",
    "a bus driver", "a tree house", "a river crossing", "a chess game",
    "an island holiday", "a kite on a windy day", "a bridge builder", "a clockmaker",
    "a school play", "a firefighter", "a jungle expedition", "a postman's route",
    "a street musician", "a dragon who is afraid of the dark", "a camping trip",
    "a grandmother's recipe",
]  # fmt: skip
TEMPLATES = [
    "Write a short story about {}.",
    "Describe {} in a few sentences.",
    "Write a short poem about {}.",
    "Tell me something interesting about {}.",
]


def open_prompts(split: str) -> list[str]:
    """Open-ended prompts (free text, real entropy): ``train`` uses the first 45 topics,
    ``heldout`` the other 15; every topic with each of the four templates."""
    topics = TOPICS[:45] if split == "train" else TOPICS[45:]
    return [template.format(topic) for topic in topics for template in TEMPLATES]
