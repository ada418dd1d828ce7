"""The synthetic dataset's word lists: name parts of items and people, genres with their mood
words, and the general concept words of the templates."""

from __future__ import annotations

ADJECTIVES = (
    "Silent Broken Golden Hidden Last Lost Dark Bright Endless Frozen Wild Quiet Burning Crimson "
    "Distant Electric Fallen Final Forgotten Gentle Haunted Hollow Iron Lonely Midnight Northern "
    "Painted Restless Sacred Secret Shattered Silver Stolen Strange Sudden Velvet Wandering Wicked "
    "Winter Yellow").split()
NOUNS = (
    "River Kingdom Garden City Road Harbor Mountain Mirror Letter Horizon Island Forest Storm "
    "Shadow Promise Empire Voyage Signal Dream Echo Frontier Machine Ocean Orchard Palace Planet "
    "Prophecy Return Summit Station Stranger Tide Tower Valley Village Whisper Witness Wolf "
    "Legacy Lantern").split()
YEARS = [str(y) for y in range(1960, 2024)]
PARTS = ("", " II", " III", " IV")  # sequels widen the name space for very large catalogs
FIRST_NAMES = (
    "Anna Ben Carla David Elena Frank Grace Henry Iris Jack Karen Leo Maria Nick Olivia Paul "
    "Quinn Rosa Sam Tara Umar Vera Walter Xenia Yusuf Zoe Alice Bruno Chloe Diego Emma Felix "
    "Hana Ivan Julia Kofi Lena Marco Nina Oscar").split()
LAST_NAMES = (
    "Berg Carter Duval Ellis Fischer Garcia Hughes Ito Jensen Keller Lopez Moreau Novak Okafor "
    "Park Quint Rossi Silva Tanaka Ueda Vance Weber Xu Young Zeller Adler Brooks Costa Dunn Evans "
    "Ford Grant Hale Ingram Jones Kim Lund Mills Nash Olsen").split()
MAX_ITEMS = len(ADJECTIVES) * len(NOUNS) * len(YEARS) * len(PARTS)
MAX_PEOPLE = len(FIRST_NAMES) * len(LAST_NAMES) * (len(FIRST_NAMES) + 1)  # optional middle name

# genre -> two mood words (concepts linked to the genre in the word KG); ordered by commonness
GENRES: dict[str, tuple[str, str]] = {
    "comedy": ("funny", "hilarious"),
    "drama": ("moving", "emotional"),
    "action": ("exciting", "intense"),
    "thriller": ("suspenseful", "tense"),
    "romance": ("romantic", "sweet"),
    "horror": ("scary", "creepy"),
    "sci-fi": ("futuristic", "imaginative"),
    "animation": ("colorful", "charming"),
    "crime": ("gritty", "violent"),
    "adventure": ("epic", "thrilling"),
    "fantasy": ("magical", "enchanting"),
    "mystery": ("puzzling", "clever"),
    "family": ("heartwarming", "wholesome"),
    "documentary": ("informative", "insightful"),
    "biography": ("inspiring", "touching"),
    "musical": ("joyful", "catchy"),
    "war": ("harrowing", "brutal"),
    "western": ("rugged", "dusty"),
    "history": ("grand", "detailed"),
    "sport": ("uplifting", "energetic"),
}
# template words that are concepts (ConceptNet-like word nodes), and related pairs among them
GENERAL_CONCEPTS = ("movie", "movies", "film", "films", "story", "classic", "actor", "favorite",
                    "acting", "ending", "director", "watch", "recommend", "enjoy", "love", "fan")
GENERAL_RELATED = (("movie", "film"), ("movies", "films"), ("movie", "movies"), ("film", "films"),
                   ("story", "ending"), ("actor", "acting"), ("director", "film"),
                   ("watch", "movie"), ("love", "enjoy"), ("fan", "love"), ("favorite", "love"),
                   ("recommend", "movie"), ("classic", "film"))
