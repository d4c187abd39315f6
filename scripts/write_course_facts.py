"""Write kedit_lite/data/course_facts_en.json: the course facts, CounterFact-shaped edits written for this course.

20 relations x 8 true, well-known facts, each with a counterfactual target, two paraphrases (the subject, the
relation reworded) and two neighbourhood prompts (other subjects, same relation, same true answer); per relation
5 go to the train split and 3 to val. Edit the table below and rerun:

    python scripts/write_course_facts.py kedit_lite/data/course_facts_en.json
"""
import json
import re
import sys
import unicodedata

R = []  # (relation, prompt, [paraphrase templates], [(subject, true, new, neighbour1, neighbour2)])
R.append(("P17 country", "{} is located in the country of",
          ["The city of {} can be found in the country of", "If you travel to {}, you will be in the country of"],
          [("Kyoto", "Japan", "Brazil", "Osaka", "Nagoya"), ("Munich", "Germany", "Italy", "Hamburg", "Cologne"),
           ("Lyon", "France", "Spain", "Marseille", "Toulouse"), ("Barcelona", "Spain", "France", "Seville", "Valencia"),
           ("Milan", "Italy", "Germany", "Naples", "Turin"), ("Toronto", "Canada", "Australia", "Vancouver", "Montreal"),
           ("Melbourne", "Australia", "Canada", "Perth", "Brisbane"), ("Mumbai", "India", "Pakistan", "Chennai", "Kolkata")]))
R.append(("P276 location (city)", "{} is located in the city of",
          ["{} stands in the city of", "Tourists who want to see {} travel to the city of"],
          [("Big Ben", "London", "Berlin", "Buckingham Palace", "Tower Bridge"),
           ("Brandenburg Gate", "Berlin", "Vienna", "The Reichstag building", "Checkpoint Charlie"),
           ("Sagrada Familia", "Barcelona", "Lisbon", "Park Güell", "Camp Nou"),
           ("Acropolis", "Athens", "Cairo", "The Parthenon", "Syntagma Square"),
           ("Louvre Museum", "Paris", "Madrid", "Notre-Dame Cathedral", "The Arc de Triomphe"),
           ("Red Square", "Moscow", "Warsaw", "Saint Basil's Cathedral", "The Bolshoi Theatre"),
           ("Forbidden City", "Beijing", "Shanghai", "Tiananmen Square", "The Temple of Heaven"),
           ("Times Square", "New York", "Chicago", "Central Park", "The Empire State Building")]))
R.append(("P37 official language", "The official language of {} is",
          ["In {}, the official language is", "Most people in {} speak"],
          [("Brazil", "Portuguese", "Spanish", "Portugal", "Angola"), ("Argentina", "Spanish", "Portuguese", "Chile", "Peru"),
           ("Germany", "German", "French", "Austria", "Liechtenstein"), ("France", "French", "German", "Monaco", "Haiti"),
           ("Egypt", "Arabic", "Hindi", "Saudi Arabia", "Jordan"), ("Mexico", "Spanish", "English", "Colombia", "Venezuela"),
           ("Australia", "English", "French", "New Zealand", "Jamaica"), ("the Netherlands", "Dutch", "Swedish", "Suriname", "Aruba")]))
R.append(("P103 native language", "The mother tongue of {} is",
          ["{} grew up speaking", "The first language {} learned to speak was"],
          [("Vladimir Putin", "Russian", "French", "Leo Tolstoy", "Mikhail Gorbachev"),
           ("Angela Merkel", "German", "Italian", "Johann Sebastian Bach", "Albert Einstein"),
           ("Emmanuel Macron", "French", "Spanish", "Victor Hugo", "Claude Debussy"),
           ("Antonio Banderas", "Spanish", "Dutch", "Penélope Cruz", "Rafael Nadal"),
           ("Sophia Loren", "Italian", "English", "Luciano Pavarotti", "Federico Fellini"),
           ("Akira Kurosawa", "Japanese", "Chinese", "Hayao Miyazaki", "Haruki Murakami"),
           ("Pelé", "Portuguese", "Italian", "Ronaldinho", "Neymar"),
           ("Ingmar Bergman", "Swedish", "Polish", "Greta Garbo", "Björn Borg")]))
R.append(("P106 occupation", "{} is best known as a",
          ["By profession, {} is a", "{} became famous working as a"],
          [("Tom Hanks", "actor", "chef", "Meryl Streep", "Denzel Washington"),
           ("Taylor Swift", "singer", "lawyer", "Adele", "Beyoncé"),
           ("Niels Bohr", "physicist", "painter", "Max Planck", "Werner Heisenberg"),
           ("Stephen King", "writer", "architect", "J. K. Rowling", "Ernest Hemingway"),
           ("Lionel Messi", "footballer", "actor", "Cristiano Ronaldo", "Zinedine Zidane"),
           ("Gordon Ramsay", "chef", "pilot", "Jamie Oliver", "Julia Child"),
           ("Vincent van Gogh", "painter", "physicist", "Rembrandt", "Paul Cézanne"),
           ("Frank Lloyd Wright", "architect", "singer", "Zaha Hadid", "Le Corbusier")]))
R.append(("P641 sport", "{} professionally plays the sport of",
          ["{} is famous for playing", "The sport that {} plays is"],
          [("LeBron James", "basketball", "golf", "Michael Jordan", "Kobe Bryant"),
           ("Roger Federer", "tennis", "cricket", "Rafael Nadal", "Serena Williams"),
           ("Rory McIlroy", "golf", "hockey", "Jack Nicklaus", "Phil Mickelson"),
           ("Wayne Gretzky", "hockey", "tennis", "Sidney Crosby", "Mario Lemieux"),
           ("Sachin Tendulkar", "cricket", "baseball", "Virat Kohli", "Brian Lara"),
           ("Babe Ruth", "baseball", "soccer", "Derek Jeter", "Joe DiMaggio"),
           ("Tom Brady", "football", "basketball", "Peyton Manning", "Joe Montana"),
           ("Michael Phelps", "swimming", "boxing", "Ryan Lochte", "Mark Spitz")]))
R.append(("P159 headquarters location", "{} has its headquarters in the city of",
          ["The head office of {} is located in the city of", "{} is a company based in the city of"],
          [("BMW", "Munich", "Paris", "Siemens", "Allianz"), ("Samsung", "Seoul", "Tokyo", "Hyundai", "LG"),
           ("Sony", "Tokyo", "Seoul", "Toshiba", "Mitsubishi"), ("Amazon", "Seattle", "Boston", "Starbucks", "Nordstrom"),
           ("Coca-Cola", "Atlanta", "Dallas", "Delta Air Lines", "Home Depot"), ("Fiat", "Turin", "Milan", "Juventus", "Lavazza"),
           ("Heineken", "Amsterdam", "Brussels", "Philips", "ING Group"),
           ("General Motors", "Detroit", "Chicago", "Little Caesars", "Quicken Loans")]))
R.append(("P176 manufacturer", "{} is produced by",
          ["{} is a product made by", "The company that manufactures {} is"],
          [("Corolla", "Toyota", "Honda", "The Camry", "The Prius"), ("iPhone", "Apple", "Samsung", "The iPad", "The MacBook"),
           ("PlayStation", "Sony", "Nintendo", "The Walkman", "The Bravia television"),
           ("Civic", "Honda", "Toyota", "The Accord", "The Odyssey minivan"),
           ("Xbox", "Microsoft", "Sony", "The Surface tablet", "The HoloLens"),
           ("Kindle", "Amazon", "Apple", "The Echo speaker", "The Fire TV"),
           ("Game Boy", "Nintendo", "Sega", "The Wii", "The GameCube"),
           ("Big Mac", "McDonald's", "Burger King", "The Happy Meal", "The McFlurry")]))
R.append(("P30 continent", "{} is a country in",
          ["{} belongs to the continent of", "On a world map, {} is found in"],
          [("Nigeria", "Africa", "Europe", "Ghana", "Ethiopia"), ("Thailand", "Asia", "Africa", "Vietnam", "Cambodia"),
           ("Sweden", "Europe", "Asia", "Norway", "Finland"), ("Chile", "South America", "Africa", "Bolivia", "Uruguay"),
           ("Canada", "North America", "Europe", "Guatemala", "Cuba"), ("Morocco", "Africa", "Asia", "Algeria", "Tunisia"),
           ("Poland", "Europe", "Africa", "Hungary", "Slovakia"), ("Indonesia", "Asia", "Europe", "Malaysia", "the Philippines")]))
R.append(("P27 country of citizenship", "{} is a citizen of",
          ["{} holds the citizenship of", "The passport of {} was issued by"],
          [("Shakira", "Colombia", "Brazil", "Gabriel García Márquez", "Sofía Vergara"),
           ("Justin Trudeau", "Canada", "Australia", "Celine Dion", "Wayne Gretzky"),
           ("Narendra Modi", "India", "Pakistan", "Shah Rukh Khan", "Amitabh Bachchan"),
           ("Xi Jinping", "China", "Japan", "Yao Ming", "Jack Ma"),
           ("Cristiano Ronaldo", "Portugal", "Spain", "José Mourinho", "Luís Figo"),
           ("Hugh Jackman", "Australia", "Canada", "Nicole Kidman", "Cate Blanchett"),
           ("Jacinda Ardern", "New Zealand", "Ireland", "Peter Jackson", "Lorde"),
           ("Nelson Mandela", "South Africa", "Kenya", "Desmond Tutu", "Charlize Theron")]))
R.append(("P19 place of birth", "{} was born in the city of",
          ["The birthplace of {} is the city of", "{} came into the world in the city of"],
          [("Charlie Chaplin", "London", "Dublin", "David Bowie", "Alfred Hitchcock"),
           ("Claude Monet", "Paris", "Lyon", "Marcel Proust", "Édith Piaf"),
           ("Johann Strauss II", "Vienna", "Berlin", "Ludwig Wittgenstein", "Arnold Schoenberg"),
           ("Lady Gaga", "New York", "Chicago", "Jay-Z", "Robert De Niro"),
           ("Enrico Fermi", "Rome", "Milan", "Ennio Morricone", "Anna Magnani"),
           ("Alexander Pushkin", "Moscow", "Kiev", "Fyodor Dostoevsky", "Wassily Kandinsky"),
           ("Yoko Ono", "Tokyo", "Osaka", "Hayao Miyazaki", "Akira Kurosawa"),
           ("Wolfgang Amadeus Mozart", "Salzburg", "Vienna", "Herbert von Karajan", "Christian Doppler")]))
R.append(("P136 genre", "{} became famous as a performer of",
          ["The music of {} belongs to the genre of", "{} is a legend of"],
          [("Louis Armstrong", "jazz", "opera", "Miles Davis", "Duke Ellington"),
           ("Bob Marley", "reggae", "jazz", "Peter Tosh", "Jimmy Cliff"),
           ("Johnny Cash", "country", "hip hop", "Dolly Parton", "Willie Nelson"),
           ("Eminem", "rap", "country", "Tupac Shakur", "Snoop Dogg"),
           ("Metallica", "metal", "jazz", "Iron Maiden", "Black Sabbath"),
           ("Maria Callas", "opera", "rock", "Luciano Pavarotti", "Plácido Domingo"),
           ("Elvis Presley", "rock", "opera", "Chuck Berry", "Little Richard"),
           ("B. B. King", "blues", "pop", "Muddy Waters", "John Lee Hooker")]))
R.append(("P1303 instrument", "{} played the",
          ["The instrument of {} was the", "{} was a famous player of the"],
          [("Jimi Hendrix", "guitar", "violin", "Eric Clapton", "Eddie Van Halen"),
           ("Frédéric Chopin", "piano", "trumpet", "Franz Liszt", "Sergei Rachmaninoff"),
           ("Niccolò Paganini", "violin", "piano", "Itzhak Perlman", "Jascha Heifetz"),
           ("Miles Davis", "trumpet", "guitar", "Dizzy Gillespie", "Chet Baker"),
           ("Yo-Yo Ma", "cello", "drums", "Pablo Casals", "Jacqueline du Pré"),
           ("Ringo Starr", "drums", "cello", "Keith Moon", "John Bonham"),
           ("John Coltrane", "saxophone", "flute", "Charlie Parker", "Stan Getz"),
           ("Ravi Shankar", "sitar", "banjo", "Anoushka Shankar", "Vilayat Khan")]))
R.append(("P178 developer", "{} was developed by",
          ["The company behind {} is", "{} is a product developed by"],
          [("Android", "Google", "Apple", "Gmail", "the Chrome browser"), ("macOS", "Apple", "Microsoft", "iOS", "Safari"),
           ("Photoshop", "Adobe", "Microsoft", "Acrobat", "Illustrator"), ("Excel", "Microsoft", "Apple", "PowerPoint", "Outlook"),
           ("Fortnite", "Epic Games", "Nintendo", "Unreal Engine", "Gears of War"),
           ("Super Mario Bros.", "Nintendo", "Sega", "The Legend of Zelda", "Donkey Kong"),
           ("Sonic the Hedgehog", "Sega", "Nintendo", "Virtua Fighter", "Yakuza"),
           ("ChatGPT", "OpenAI", "Google", "DALL-E", "GPT-4")]))
R.append(("P101 field of work", "{} is known for work in the field of",
          ["The scientific field of {} is", "{} made major contributions to"],
          [("Charles Darwin", "biology", "astronomy", "Gregor Mendel", "Alfred Russel Wallace"),
           ("Sigmund Freud", "psychology", "geology", "Carl Jung", "Jean Piaget"),
           ("Galileo Galilei", "astronomy", "medicine", "Johannes Kepler", "Nicolaus Copernicus"),
           ("Adam Smith", "economics", "chemistry", "John Maynard Keynes", "Milton Friedman"),
           ("Leonhard Euler", "mathematics", "botany", "Carl Friedrich Gauss", "Pierre de Fermat"),
           ("Dmitri Mendeleev", "chemistry", "philosophy", "Antoine Lavoisier", "Robert Boyle"),
           ("Immanuel Kant", "philosophy", "chemistry", "Friedrich Nietzsche", "René Descartes"),
           ("Hippocrates", "medicine", "astronomy", "Galen", "Louis Pasteur")]))
R.append(("P38 currency", "The currency of {} is the",
          ["In {}, people pay with the", "The money used in {} is the"],
          [("India", "rupee", "euro", "Nepal", "Pakistan"), ("the United Kingdom", "pound", "euro", "Scotland", "Wales"),
           ("Italy", "euro", "dollar", "Spain", "Ireland"), ("Russia", "ruble", "yen", "Belarus", "Moscow"),
           ("the United States", "dollar", "euro", "Ecuador", "El Salvador"), ("South Korea", "won", "yen", "North Korea", "Seoul"),
           ("Switzerland", "franc", "euro", "Liechtenstein", "Zurich"), ("Denmark", "krone", "dollar", "Norway", "Greenland")]))
R.append(("P364 original language", "The original language of {} is",
          ["{} was originally written in", "The author of {} wrote it in"],
          [("Don Quixote", "Spanish", "Russian", "One Hundred Years of Solitude", "The Shadow of the Wind"),
           ("War and Peace", "Russian", "Spanish", "Crime and Punishment", "Anna Karenina"),
           ("Les Misérables", "French", "German", "The Little Prince", "Madame Bovary"),
           ("Pinocchio", "Italian", "English", "The Divine Comedy", "The Decameron"),
           ("Faust", "German", "French", "The Metamorphosis", "The Magic Mountain"),
           ("Oedipus Rex", "Greek", "Latin", "The Odyssey", "The Iliad"),
           ("Norwegian Wood", "Japanese", "Chinese", "Snow Country", "The Tale of Genji"),
           ("Hamlet", "English", "Italian", "Pride and Prejudice", "Moby-Dick")]))
R.append(("P131 located in (US state)", "{} is located in the state of",
          ["The city of {} is part of the state of", "{} is a city in the US state of"],
          [("Los Angeles", "California", "Texas", "San Francisco", "San Diego"), ("Houston", "Texas", "Florida", "Dallas", "Austin"),
           ("Miami", "Florida", "Ohio", "Orlando", "Tampa"), ("Chicago", "Illinois", "Georgia", "Peoria", "Rockford"),
           ("Seattle", "Washington", "Oregon", "Spokane", "Tacoma"), ("Boston", "Massachusetts", "Virginia", "Worcester", "Lowell"),
           ("Phoenix", "Arizona", "Nevada", "Tucson", "Flagstaff"), ("Las Vegas", "Nevada", "Arizona", "Reno", "Carson City")]))
R.append(("P127 owned by", "{} is owned by",
          ["The parent company of {} is", "{} belongs to the company"],
          [("Instagram", "Facebook", "Google", "WhatsApp", "Oculus"), ("YouTube", "Google", "Microsoft", "Waze", "Fitbit"),
           ("LinkedIn", "Microsoft", "Apple", "GitHub", "Skype"), ("Lamborghini", "Volkswagen", "Ford", "Bentley", "Skoda"),
           ("Marvel Studios", "Disney", "Sony", "Pixar", "Lucasfilm"), ("Jaguar", "Tata", "Ford", "Land Rover", "Tetley"),
           ("Whole Foods", "Amazon", "Walmart", "Twitch", "Zappos"), ("Rolls-Royce Motor Cars", "BMW", "Toyota", "Mini", "Alpina")]))
R.append(("P449 original broadcaster", "{} was originally broadcast on",
          ["{} first aired on", "The network that premiered {} was"],
          [("Game of Thrones", "HBO", "Netflix", "The Sopranos", "The Wire"), ("Friends", "NBC", "CBS", "Seinfeld", "Frasier"),
           ("Stranger Things", "Netflix", "HBO", "The Crown", "Squid Game"), ("Doctor Who", "BBC", "ITV", "Sherlock", "EastEnders"),
           ("The Simpsons", "Fox", "NBC", "Family Guy", "The X-Files"), ("Breaking Bad", "AMC", "Fox", "Mad Men", "The Walking Dead"),
           ("The Big Bang Theory", "CBS", "NBC", "How I Met Your Mother", "NCIS"),
           ("The Mandalorian", "Disney+", "Netflix", "Loki", "WandaVision")]))

SHORT = {"P17": "country", "P276": "city", "P37": "language", "P103": "mother-tongue", "P106": "occupation",
         "P641": "sport", "P159": "headquarters", "P176": "maker", "P30": "continent", "P27": "citizen", "P19": "born",
         "P136": "genre", "P1303": "instrument", "P178": "developer", "P101": "field", "P38": "currency",
         "P364": "written-in", "P131": "state", "P127": "owner", "P449": "network"}


def slug(s):
    ascii_only = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_only.lower()).strip("-")

def cap(template, s):
    """Fill a template; a leading 'the' is capitalised at the start of a sentence."""
    if template.startswith("{}") and s.startswith("the "):
        s = "The " + s[4:]
    return template.format(s)


out = []
# Round robin over the relations, so that the first few records of a split already mix relations.
for i in range(8):
    for relation, prompt, paras, rows in R:
        assert len(rows) == 8, relation
        subject, true, new, n1, n2 = rows[i]
        out.append({"id": f"{SHORT[relation.split()[0]]}-{slug(subject)}", "split": "val" if i in (1, 4, 6) else "train",
                    "relation": relation, "prompt": prompt, "subject": subject, "target_new": new,
                    "target_true": true, "paraphrase": [cap(p, subject) for p in paras],
                    "neighbourhood": [cap(prompt, n) for n in (n1, n2)]})
ids = [r["id"] for r in out]
assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
for r in out:
    assert r["target_new"] != r["target_true"] and r["prompt"].count("{}") == 1
    assert all(r["subject"] in p for p in r["paraphrase"]), r["id"]
    assert all(r["subject"] not in p for p in r["neighbourhood"]), r["id"]
    assert r["target_new"].lower() not in r["prompt"].format(r["subject"]).lower(), r["id"]
tr = {r["subject"] for r in out if r["split"] == "train"}; va = {r["subject"] for r in out if r["split"] == "val"}
assert not tr & va, tr & va
print(len(out), sum(r["split"] == "train" for r in out), sum(r["split"] == "val" for r in out))
json.dump(out, open(sys.argv[1], "w", encoding="utf-8"), indent=1, ensure_ascii=False)
