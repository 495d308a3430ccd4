"""Tables of the `style="diverse"` synthetic data (`trainers.synthetic`): paraphrase cores, sentence frames, value
vocabularies and the distractor pool. Plain data only; `trainers.synthetic` builds the templates, the template split
and the value pools from them.

A template is a **core** (the clause that carries the fact, question or reply, written as it reads mid-sentence:
"my cat is called {v}", "{v} is the name of my cat") placed in a **frame** ("{c}.", "By the way, {c}.", "{c}, by the
way."). Questions have a direct core ("what is my cat called", frames "{q}?", "Remind me, {q}?") and an indirect one
("what my cat is called", frames "Do you recall {i}?", "Can you tell me {i}?"). `{v}` is the value, `{a}` its
indefinite article. Acknowledgements and answers share the reply cores and differ in their frames.
"""

from __future__ import annotations

STATEMENT_FRAMES = (
    "{c}.", "By the way, {c}.", "{c}, by the way.", "Just so you know, {c}.", "Oh, and {c}.", "Quick note: {c}.",
    "Something about me: {c}.", "I should mention that {c}.", "Fun fact: {c}.", "For the record, {c}.",
    "Please remember that {c}.", "Well, {c}.",
)  # fmt: skip
ACK_FRAMES = (
    "Noted: {c}.", "Got it, {c}.", "Thanks, I will remember that {c}.", "OK, {c}.", "Understood: {c}.",
    "Good to know, {c}.", "I see, {c}.", "Lovely, {c}.",
)  # fmt: skip
ANSWER_FRAMES = (
    "{c}.", "You told me that {c}.", "If I remember right, {c}.", "{c}, as you said.", "Sure: {c}.",
    "As far as I know, {c}.", "Let me think. {c}.", "Of course, {c}.",
)  # fmt: skip
DIRECT_QUESTION_FRAMES = ("{q}?", "Remind me, {q}?", "Quick question: {q}?", "So, {q}?", "Hey, {q}?",
                          "Sorry, I forgot: {q}?", "One more thing: {q}?", "Do you know: {q}?")  # fmt: skip
INDIRECT_QUESTION_FRAMES = ("Do you recall {q}?", "Can you tell me {q}?", "Do you remember {q}?",
                            "Do you still know {q}?", "Tell me {q}, please.", "I wonder whether you know {q}.",
                            "Could you remind me {q}?", "I would like to hear {q}.")  # fmt: skip


def _named(relation: str) -> dict:
    """Cores of a named relation (pets, family, friends): `relation` is "cat", "sister", ..."""
    r = relation
    return {
        "statements": (
            f"my {r} is called {{v}}", f"my {r}'s name is {{v}}", f"{{v}} is the name of my {r}",
            f"I have a {r} named {{v}}", f"my {r} goes by {{v}}", f"we all call my {r} {{v}}",
            f"my {r}, {{v}}, says hello", f"{{v}} is what my {r} is called",
        ),
        "replies": (
            f"your {r} is called {{v}}", f"your {r}'s name is {{v}}", f"{{v}} is the name of your {r}",
            f"you have a {r} named {{v}}", f"your {r} goes by {{v}}", f"you all call your {r} {{v}}",
            f"the name of your {r} is {{v}}", f"{{v}} is what your {r} is called",
        ),
        "questions": (
            (f"what is my {r} called", f"what my {r} is called"),
            (f"what is my {r}'s name", f"what my {r}'s name is"),
            (f"what did I say my {r} is called", f"what I said my {r} is called"),
            (f"which name does my {r} have", f"which name my {r} has"),
            (f"what do we call my {r}", f"what we call my {r}"),
        ),
    }  # fmt: skip


# attribute -> cores; the value kind of each attribute is in `VALUE_KINDS`
ATTRIBUTE_CORES: dict[str, dict] = {
    "name": {
        "statements": ("my name is {v}", "I am {v}", "you can call me {v}", "{v} is my name", "people call me {v}",
                       "everyone knows me as {v}", "I go by {v}", "my friends call me {v}"),
        "replies": ("your name is {v}", "you are {v}", "you are called {v}", "{v} is your name", "people call you {v}",
                    "you go by {v}", "you introduced yourself as {v}", "everyone knows you as {v}"),
        "questions": (("what is my name", "what my name is"), ("what am I called", "what I am called"),
                      ("who am I", "who I am"), ("what do people call me", "what people call me"),
                      ("which name did I give you", "which name I gave you")),
    },
    "cat": _named("cat"),
    "dog": _named("dog"),
    "sister": _named("sister"),
    "brother": _named("brother"),
    "friend": _named("best friend"),
    "city": {
        "statements": ("I live in {v}", "my home town is {v}", "I moved to {v} last year", "{v} is where I live",
                       "home for me is {v}", "I have lived in {v} for years", "my flat is in {v}",
                       "I grew up in {v} and still live there"),
        "replies": ("you live in {v}", "your home town is {v}", "{v} is where you live", "home for you is {v}",
                    "you have lived in {v} for years", "your flat is in {v}", "you are from {v}",
                    "you live in the town of {v}"),
        "questions": (("where do I live", "where I live"), ("which town do I live in", "which town I live in"),
                      ("what is my home town", "what my home town is"), ("where is my home", "where my home is"),
                      ("in which town is my flat", "in which town my flat is")),
    },
    "street": {
        "statements": ("I live on {v}", "my street is {v}", "my address is on {v}", "{v} is my street",
                       "our house is on {v}", "you can find my house on {v}", "I moved to a flat on {v}",
                       "the street I live on is {v}"),
        "replies": ("you live on {v}", "your street is {v}", "your address is on {v}", "{v} is your street",
                    "your house is on {v}", "the street you live on is {v}", "your flat is on {v}",
                    "you have a house on {v}"),
        "questions": (("what street do I live on", "what street I live on"), ("what is my street", "what my street is"),
                      ("where is my house", "where my house is"),
                      ("which street is my address on", "which street my address is on"),
                      ("on which street is our house", "on which street our house is")),
    },
    "locker_code": {
        "statements": ("my locker code is {v}", "the code of my locker is {v}", "{v} opens my locker",
                       "I use {v} as my locker code", "my locker opens with {v}",
                       "the combination for my locker is {v}", "{v} is the code for my locker",
                       "I set my locker code to {v}"),
        "replies": ("your locker code is {v}", "the code is {v}", "{v} opens your locker", "your locker opens with {v}",
                    "the combination is {v}", "you set your locker code to {v}", "{v} is the code for your locker",
                    "you use {v} for your locker"),
        "questions": (("what is my locker code", "what my locker code is"),
                      ("which code opens my locker", "which code opens my locker"),
                      ("what code did I set for my locker", "what code I set for my locker"),
                      ("what is the combination for my locker", "what the combination for my locker is"),
                      ("how do I open my locker", "how I open my locker")),
    },
    "room_number": {
        "statements": ("my room number is {v}", "I am staying in room {v}", "my room is number {v}", "room {v} is mine",
                       "they gave me room {v}", "I sleep in room {v}", "my hotel room is {v}",
                       "{v} is my room number"),
        "replies": ("your room number is {v}", "you are in room {v}", "your room is number {v}", "room {v} is yours",
                    "they gave you room {v}", "you sleep in room {v}", "{v} is your room number",
                    "you are staying in room {v}"),
        "questions": (("what is my room number", "what my room number is"), ("which room am I in", "which room I am in"),
                      ("which room did they give me", "which room they gave me"),
                      ("where am I staying", "where I am staying"), ("what number is my room", "what number my room is")),
    },
    "colour": {
        "statements": ("my favourite colour is {v}", "I like the colour {v} best", "the colour I love most is {v}",
                       "{v} is my favourite colour", "nothing beats {v} as a colour", "I would paint everything {v}",
                       "if I had to pick a colour, it would be {v}", "my favourite shade is {v}"),
        "replies": ("your favourite colour is {v}", "you like {v} best", "{v} is your favourite colour",
                    "you love the colour {v}", "you would paint everything {v}", "your favourite shade is {v}",
                    "you picked {v}", "the colour you love most is {v}"),
        "questions": (("what is my favourite colour", "what my favourite colour is"),
                      ("which colour do I like best", "which colour I like best"),
                      ("what colour would I paint everything", "what colour I would paint everything"),
                      ("what shade do I love", "what shade I love"), ("which colour did I pick", "which colour I picked")),
    },
    "job": {
        "statements": ("I work as {a} {v}", "my job is being {a} {v}", "I earn my living as {a} {v}",
                       "I am {a} {v} by trade", "{a} {v} is what I am", "for work I am {a} {v}",
                       "I have been {a} {v} for ten years", "my job title is {v}"),
        "replies": ("you work as {a} {v}", "you are {a} {v}", "your job title is {v}", "you earn your living as {a} {v}",
                    "you are {a} {v} by trade", "for work you are {a} {v}", "you have been {a} {v} for years",
                    "your job is {v}"),
        "questions": (("what is my job", "what my job is"), ("what do I do for a living", "what I do for a living"),
                      ("what do I work as", "what I work as"), ("what is my job title", "what my job title is"),
                      ("how do I earn my living", "how I earn my living")),
    },
    "food": {
        "statements": ("my favourite food is {v}", "I love eating {v}", "nothing beats {v} for me",
                       "{v} is my favourite dish", "I could eat {v} every day", "my favourite meal is {v}",
                       "when I cook, I make {v}", "I always order {v}"),
        "replies": ("your favourite food is {v}", "you love {v}", "{v} is your favourite dish",
                    "you could eat {v} every day", "your favourite meal is {v}", "you always order {v}",
                    "you love eating {v}", "nothing beats {v} for you"),
        "questions": (("what is my favourite food", "what my favourite food is"),
                      ("what do I love to eat", "what I love to eat"),
                      ("what could I eat every day", "what I could eat every day"),
                      ("what do I always order", "what I always order"),
                      ("which dish do I like best", "which dish I like best")),
    },
    "hobby": {
        "statements": ("my hobby is {v}", "in my free time I enjoy {v}", "I spend weekends {v}", "{v} is my hobby",
                       "I relax by {v}", "my favourite pastime is {v}", "I got into {v} last year",
                       "after work I like {v}"),
        "replies": ("your hobby is {v}", "you enjoy {v}", "{v} is your hobby", "you relax by {v}",
                    "your favourite pastime is {v}", "you spend weekends {v}", "you like {v} after work",
                    "in your free time you enjoy {v}"),
        "questions": (("what is my hobby", "what my hobby is"),
                      ("what do I enjoy in my free time", "what I enjoy in my free time"),
                      ("how do I spend weekends", "how I spend weekends"),
                      ("what is my favourite pastime", "what my favourite pastime is"), ("how do I relax", "how I relax")),
    },
}

# attribute -> value kind (the value generators of `trainers.synthetic`)
VALUE_KINDS = {"name": "name", "cat": "name", "dog": "name", "sister": "name", "brother": "name", "friend": "name",
               "city": "town", "street": "street", "locker_code": "code", "room_number": "room", "colour": "colour",
               "job": "job", "food": "food", "hobby": "hobby"}  # fmt: skip

# Name syllables: several shapes (V, CV, CVC, CCV ...), 1-4 syllables, several endings.
NAME_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "j", "k", "kl", "l", "m", "n", "p", "r", "s", "sh", "st", "t",
               "tr", "v", "z", "h", "ch")  # fmt: skip
NAME_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
NAME_CODAS = ("", "", "", "n", "l", "r", "m", "s", "k", "th", "x", "nd")
NAME_ENDINGS = ("", "", "a", "o", "ie", "ina", "elle", "us", "en", "ia", "ette", "ard")
TOWN_PREFIXES = ("New", "Upper", "Lower", "Port", "East", "West", "North", "South", "Old", "Little", "Great", "Saint")
TOWN_SUFFIXES = ("ford", "ton", "by", "ville", "burg", "mouth", "field", "port", "wick", "dale", "haven", "stead",
                 "bridge", "holm", "moor", "cester", "minster", "worth", "ham", "grove")  # fmt: skip
STREET_WORDS = (
    "Maple", "Birch", "Cedar", "Willow", "Elm", "Oak", "Ash", "Rowan", "Hazel", "Juniper", "Alder", "Poplar",
    "Chestnut", "Linden", "Laurel", "Holly", "Ivy", "Heather", "Thistle", "Clover", "Meadow", "Orchard", "Mill",
    "Quarry", "Harbour", "Lantern", "Falcon", "Heron", "Kestrel", "Swallow", "Copper", "Silverbrook", "Stonegate",
    "Windmill", "Riverside", "Hillcrest", "Foxglove", "Primrose", "Bramble", "Sparrow",
)  # fmt: skip
STREET_KINDS = ("Street", "Lane", "Road", "Avenue", "Close", "Way", "Crescent", "Drive", "Row", "Terrace",
                "Gardens", "Place")  # fmt: skip
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEEN_WORDS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
              "nineteen")  # fmt: skip
TENS_WORDS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
COLOUR_MODIFIERS = (
    "light", "dark", "pale", "deep", "bright", "soft", "dusty", "misty", "warm", "cool", "neon", "pastel", "muted",
    "vivid", "smoky", "frosty", "sunny", "stormy", "rich", "faded", "glossy", "electric", "royal", "dull", "icy",
    "burnt", "earthy", "velvet",
)  # fmt: skip
COLOURS = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "grey", "black", "white", "teal", "gold",
    "silver", "violet", "navy", "olive", "coral", "mint", "peach", "lilac", "amber", "cream", "rust", "plum", "jade",
    "turquoise", "crimson", "indigo", "sage",
)  # fmt: skip
FLAVOURS = (
    "spicy", "sweet", "lemon", "garlic", "cheese", "mushroom", "tomato", "chicken", "beef", "honey", "ginger",
    "coconut", "pumpkin", "apple", "cherry", "salmon", "potato", "onion", "pepper", "bean", "carrot", "spinach",
    "banana", "walnut", "chocolate", "smoked", "roasted", "crispy", "creamy", "lentil",
)  # fmt: skip
DISHES = (
    "soup", "pie", "noodles", "curry", "salad", "tacos", "pizza", "stew", "bread", "pancakes", "dumplings", "risotto",
    "burgers", "pasta", "omelette", "sandwiches", "cake", "muffins", "waffles", "rolls", "skewers", "fritters",
    "toast", "porridge", "crumble", "casserole", "lasagne", "quiche", "pastries", "flatbread",
)  # fmt: skip
JOB_DOMAINS = (
    "piano", "bike", "boat", "garden", "bread", "music", "science", "history", "art", "dance", "film", "software",
    "bridge", "furniture", "jewellery", "toy", "shoe", "clock", "map", "book", "glass", "candle", "kite", "tea", "ice",
    "wine", "roof", "train", "radio", "museum",
)  # fmt: skip
JOB_ROLES = (
    "teacher", "maker", "designer", "repairer", "seller", "tester", "builder", "painter", "collector", "inspector",
    "photographer", "writer", "engineer", "dealer", "restorer", "mechanic", "cleaner", "buyer", "critic", "curator",
    "trader", "keeper", "polisher", "printer", "planner", "technician", "consultant", "driver",
)  # fmt: skip
HOBBY_ACTIVITIES = (
    "painting", "collecting", "drawing", "building", "photographing", "sketching", "carving", "repairing", "sorting",
    "racing", "flying", "restoring", "designing", "decorating", "cleaning", "counting", "trading", "printing",
    "polishing", "making", "knitting", "sewing", "gluing", "folding", "weaving", "spotting", "mapping",
)  # fmt: skip
HOBBY_OBJECTS = (
    "stamps", "coins", "kites", "boats", "shells", "maps", "clocks", "lamps", "birds", "trains", "rocks", "leaves",
    "cards", "bottles", "robots", "puzzles", "masks", "bells", "candles", "gliders", "fossils", "posters", "models",
    "tiles", "badges", "old radios", "toy cars", "paper planes",
)  # fmt: skip

# Distractor turns: fixed pairs and families combined with the lists below (no values inside).
# Off-topic pairs of both styles (the basic style draws from these alone).
CHITCHAT_PAIRS = (
    ("How are you today?", "I am doing well, thank you for asking."),
    ("Tell me something interesting.", "Octopuses have three hearts."),
    ("What should I cook tonight?", "A simple vegetable soup is quick and warm."),
    ("Is it going to rain?", "I cannot see the sky, but an umbrella never hurts."),
    ("Can you tell me a joke?", "Why did the scarecrow win a prize? He was outstanding in his field."),
    ("I am a bit tired.", "Maybe a short break and a glass of water will help."),
    ("What time is it?", "I do not have a clock, but your device should show it."),
    ("Thanks for your help.", "You are welcome, happy to help."),
    ("Do you like music?", "I enjoy talking about music of all kinds."),
    ("What is a good way to relax?", "A slow walk outside works for many people."),
    ("How do plants grow?", "They use sunlight, water and air to make sugar."),
    ("Any tips for sleeping better?", "Keep a regular bedtime and avoid screens late at night."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("Say something nice.", "You are doing a great job today."),
    ("I just finished my work.", "Well done, enjoy the rest of your day."),
    ("Should I go for a run?", "A run sounds great if you feel up to it."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is your favourite season?", "I like spring, when everything starts to grow."),
    ("Good morning!", "Good morning, I hope you slept well."),
    ("Can you help me plan my day?", "Start with the hardest task, then take a short break."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("I watched a film yesterday.", "Nice, I hope it was a good one."),
    ("Is coffee bad for me?", "A cup or two a day is fine for most people."),
)
DISTRACTOR_PAIRS = CHITCHAT_PAIRS + (
    ("Hmm, let me think for a second.", "Take your time."),
    ("That was funny.", "I am glad it made you smile."),
    ("Do you ever sleep?", "No, but I am always happy to chat."),
    ("What is the tallest animal?", "The giraffe is the tallest animal on land."),
    ("How far away is the moon?", "About three hundred and eighty thousand kilometres."),
    ("I had a long day at work.", "That sounds tiring; I hope you can rest now."),
    ("Can you keep a secret?", "I will keep our chat between us."),
    ("What is a haiku?", "A short poem of three lines with five, seven and five syllables."),
    ("Why do leaves change colour in autumn?", "The green pigment fades and other colours show through."),
    ("Let us talk about something else.", "Sure, what would you like to talk about?"),
    ("I am bored.", "How about a short walk or a new book?"),
    ("What is the biggest ocean?", "The Pacific is the biggest ocean."),
)
DISTRACTOR_TOPICS = (
    "history", "space", "the ocean", "birds", "old trains", "mountains", "rivers", "insects", "volcanoes", "deserts",
    "bees", "whales", "the weather", "castles", "bridges", "forests", "the stars", "glaciers", "islands", "mushrooms",
    "ancient music", "paper", "chess", "the alphabet", "clocks and calendars", "rainbows",
)  # fmt: skip
DISTRACTOR_TOPIC_ANSWERS = (
    "There is a lot to learn about {t}; it is a fun subject.",
    "People have studied {t} for a long time, and there is always more to find out.",
    "A good library book is a nice start if you are curious about {t}.",
    "Many surprising things are true about {t}; pick one question and dig in.",
)
DISTRACTOR_TOPIC_QUESTIONS = ("Tell me a fact about {t}.", "What do you know about {t}?",
                              "I am curious about {t}. Anything to share?", "Can we talk about {t} for a moment?")
DISTRACTOR_GENRES = ("mystery", "adventure", "science fiction", "poetry", "fantasy", "travel", "comedy", "nature",
                     "history", "cooking")  # fmt: skip
DISTRACTOR_MEDIA = ("book", "film", "podcast", "song", "board game")
DISTRACTOR_MOODS = (("happy", "That is great to hear!"), ("sad", "I am sorry; talking about it can help."),
                    ("sleepy", "A short rest might do you good."), ("excited", "How exciting, tell me more!"),
                    ("nervous", "Take a deep breath; you will do fine."), ("hungry", "Maybe it is time for a snack."),
                    ("calm", "That is a good place to be."), ("busy", "Take it one task at a time."))  # fmt: skip
DISTRACTOR_TASKS = (
    ("boil an egg", "Put it in boiling water for about eight minutes."),
    ("fold a paper plane", "Fold the sheet in half, then fold the corners down to the middle."),
    ("clean a window", "Warm water with a little soap and a dry cloth work well."),
    ("learn a new word every day", "Write it on a card and use it in a sentence."),
    ("water a plant", "Check the soil first and water when it feels dry."),
    ("tie a knot", "Make a loop, pass the end through it and pull."),
    ("stay focused", "Put your phone away and work in short blocks."),
    ("start running", "Begin with short, easy runs and add a little each week."),
)
